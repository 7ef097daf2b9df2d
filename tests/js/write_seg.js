// Write a DICOM-SEG with dcmjs the way OHIF's Cornerstone adapter saves a segmentation:
// every segment coded "Tissue" (SRT T-D0050) with the label the user typed, RLE encoded.
// Usage: node write_seg.js SPEC.json OUT.dcm
//   SPEC.json: {"sources": [paths of the single-frame source instances, in label order],
//               "labels": path of uint8 labels (slice-major, one slice per source),
//               "segments": ["Liver", "Left kidney", ...]   (pixel value n = segment n)}
"use strict";
const fs = require("fs");
const dcmjs = require("dcmjs");

const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const toArrayBuffer = (b) => b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
const images = spec.sources.map((path, i) => ({
  imageId: `wadouri:${i}`,
  data: { byteArray: { buffer: toArrayBuffer(fs.readFileSync(path)) } },
}));
const labels = new Uint8Array(toArrayBuffer(fs.readFileSync(spec.labels)));
const first = dcmjs.data.DicomMetaDictionary.naturalizeDataset(
  dcmjs.data.DicomMessage.readFile(images[0].data.byteArray.buffer).dict);
const sliceLength = first.Rows * first.Columns;

const tissue = { CodeValue: "T-D0050", CodingSchemeDesignator: "SRT", CodeMeaning: "Tissue" };
const metadata = [undefined];
spec.segments.forEach((label, i) => {
  metadata.push({
    SegmentedPropertyCategoryCodeSequence: tissue,
    SegmentNumber: String(i + 1),
    SegmentLabel: label,
    SegmentAlgorithmType: "MANUAL",
    RecommendedDisplayCIELabValue: dcmjs.data.Colors.rgb2DICOMLAB([1, 0, 0]),
    SegmentedPropertyTypeCodeSequence: tissue,
  });
});
// The adapter's labelmaps2D follow the frame order of the multi-frame dataset it
// normalises the sources into (dcmjs sorts them by descending position along the
// normal), not the order of `images`: give both in that order.
const along = (k) => {
  const ds = dcmjs.data.DicomMetaDictionary.naturalizeDataset(
    dcmjs.data.DicomMessage.readFile(images[k].data.byteArray.buffer).dict);
  const o = ds.ImageOrientationPatient.map(Number);
  const n = [o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3]];
  return ds.ImagePositionPatient.map(Number).reduce((sum, v, i) => sum + v * n[i], 0);
};
const order = spec.sources.map((_, k) => [along(k), k]).sort((a, b) => b[0] - a[0])
  .map(([, k]) => k);
const labelmaps2D = order.map((k) => {
  const pixelData = new Uint16Array(sliceLength);
  const present = new Set();
  for (let i = 0; i < sliceLength; i++) {
    pixelData[i] = labels[k * sliceLength + i];
    if (pixelData[i]) present.add(pixelData[i]);
  }
  return { pixelData, segmentsOnLabelmap: [0, ...[...present].sort((a, b) => a - b)] };
});
const labelmap3D = { labelmaps2D, metadata };
const blob = dcmjs.adapters.Cornerstone.Segmentation.generateSegmentation(
  order.map((k) => images[k]), labelmap3D, { rleEncode: true });
blob.arrayBuffer().then((buffer) => fs.writeFileSync(process.argv[3], Buffer.from(buffer)));
