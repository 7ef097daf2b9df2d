// Parse a DICOM-SEG with dcmjs (OHIF's DICOM library) and print what a viewer relies on:
// the segments, and per frame its segment number, referenced source instance and position.
// Usage: node parse_seg.js SEG.dcm
"use strict";
const fs = require("fs");
const dcmjs = require("dcmjs");

const buffer = fs.readFileSync(process.argv[2]);
const arrayBuffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
const dicomData = dcmjs.data.DicomMessage.readFile(arrayBuffer);
const ds = dcmjs.data.DicomMetaDictionary.naturalizeDataset(dicomData.dict);

const asArray = (v) => (v === undefined ? [] : Array.isArray(v) ? v : [v]);
const shared = asArray(ds.SharedFunctionalGroupsSequence)[0] || {};
const frames = asArray(ds.PerFrameFunctionalGroupsSequence).map((item) => {
  const derivation = asArray(item.DerivationImageSequence)[0] || {};
  const source = asArray(derivation.SourceImageSequence)[0] || {};
  const plane = asArray(item.PlanePositionSequence || shared.PlanePositionSequence)[0] || {};
  return {
    segment: asArray(item.SegmentIdentificationSequence)[0].ReferencedSegmentNumber,
    referencedSOPInstanceUID: source.ReferencedSOPInstanceUID,
    imagePositionPatient: asArray(plane.ImagePositionPatient).map(Number),
  };
});
const segments = asArray(ds.SegmentSequence).map((s) => ({
  number: s.SegmentNumber,
  label: s.SegmentLabel,
  propertyType: asArray(s.SegmentedPropertyTypeCodeSequence)[0].CodeValue,
}));
// BINARY frames are bit-packed back to back (little-endian bit order within a byte).
const pixelData = new Uint8Array(asArray(ds.PixelData)[0]);
const frameBits = ds.Rows * ds.Columns;
const voxelsPerSegment = {};
frames.forEach((frame, f) => {
  let count = 0;
  for (let bit = f * frameBits; bit < (f + 1) * frameBits; bit++) {
    count += (pixelData[bit >> 3] >> (bit & 7)) & 1;
  }
  voxelsPerSegment[frame.segment] = (voxelsPerSegment[frame.segment] || 0) + count;
});
process.stdout.write(JSON.stringify({
  voxelsPerSegment,
  modality: ds.Modality,
  numberOfFrames: Number(ds.NumberOfFrames),
  rows: ds.Rows,
  columns: ds.Columns,
  segments,
  frames,
}));
