/** @type {AppTypes.Config} */
// OHIF 3.13 configuration for a Tessera node's DICOMweb (viewer_bridge).
//
// Default: OHIF is served by the node itself (`http.ohif_dir`), same origin as
// /dicomweb. The browser signs in once at /login and its HttpOnly cookie
// authenticates every DICOMweb request; no token is written into this file.
//
// OHIF served from another origin: set TESSERA_ROOT to the node's DICOMweb URL,
// add that origin to `http.cors_origins`, and either open the viewer with
// `?token=<token>` (OHIF sends it as a bearer token) or set TESSERA_TOKEN (then
// anyone who can load this file holds the token: keep such a deployment private).
const TESSERA_ROOT = window.location.origin + '/dicomweb';
const TESSERA_TOKEN = '';

// How OHIF encodes the segmentation its Save ("Store Segmentation") sends to the node:
// 'labelmap' = Label Map Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.7), one
// label per voxel, RLE Lossless: OHIF 3.13's own default, the smallest file, and
// exactly what the node trains on (one model label per voxel). The node reads it
// and 'bitmap' (binary Segmentation Storage, 1.2.840.10008.5.1.4.1.1.66.4) alike as
// corrections. Choose 'bitmap' only when these SEGs must also reach a PACS or
// viewer that does not know Label Map SEG (dcmtk 3.6.7, for one, cannot send it),
// and know that OHIF 3.13's bitmap Save of a segmentation with an empty segment
// renumbers the segments but not the frames: the node refuses such a SEG (shown in
// `tessera node status`) rather than train on the wrong labels.
// Both are tested by clicking Save in OHIF (tests/viewer/test_ohif_save.py).
const SEG_STORE_MODE = 'labelmap';

window.config = {
  name: 'tessera',
  routerBasename: '/',
  extensions: [],
  modes: [],
  // OHIF 3.13 customization key (extensions/cornerstone-dicom-seg segmentationConfig).
  customizationService: { 'segmentation.store.defaultMode': { $set: SEG_STORE_MODE } },
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  groupEnabledModesFirst: true,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 25 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'tessera',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'tessera',
      configuration: {
        friendlyName: 'Tessera node',
        name: 'tessera',
        wadoUriRoot: TESSERA_ROOT,
        qidoRoot: TESSERA_ROOT,
        wadoRoot: TESSERA_ROOT,
        stowRoot: TESSERA_ROOT,
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        // Saving a segmentation stores a DICOM SEG with STOW-RS: the node's
        // correction intake turns it into a training sample.
        supportsStow: true,
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
        ...(TESSERA_TOKEN
          ? { requestOptions: { auth: () => 'Bearer ' + TESSERA_TOKEN } }
          : {}),
      },
    },
  ],
  httpErrorHandler: error => {
    console.warn('tessera dicomweb error', error.status);
  },
};
