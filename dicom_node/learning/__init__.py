"""Learning: the segmentation network, its weights, training, inference and metrics.

- :mod:`~dicom_node.learning.model_config`: a model as data (architecture name,
  hyper-parameters, heads, labels with SNOMED CT codes, preprocessing, generation).
- :mod:`~dicom_node.learning.multihead`: a network with heads, one shared ``encoder``
  and named ``heads``; parameter names are the hub's contract (``encoder.*``,
  ``heads.<name>.*``). :mod:`~dicom_node.learning.network` is our 2D U-Net, and
  :mod:`~dicom_node.learning.monai_heads` a MONAI network as the encoder of our heads
  (the shipped starter's architecture).
- :mod:`~dicom_node.learning.weights`: safetensors + JSON I/O (never unpickles) and the
  parameter-group extract/apply used by federation.
- :mod:`~dicom_node.learning.training`: a round of training (policy, step loop, time
  budget, progress hook, report), frozen-encoder training of new heads; its parts:
  :mod:`~dicom_node.learning.slices` (training slices), :mod:`~dicom_node.learning.batches`
  (batch mix and augmentation), :mod:`~dicom_node.learning.losses` (masked loss for
  partial labels, distillation, L2-SP), :mod:`~dicom_node.learning.thread_tuning`.
- :mod:`~dicom_node.learning.inference`: ``segment_volume`` (batched, deterministic).
- :mod:`~dicom_node.learning.scores`: Dice and quality metrics, numpy only.
- :mod:`~dicom_node.learning.bootstrap` and :mod:`~dicom_node.learning.cli`: the starter
  model (``tessera model bootstrap|list``), shipped in ``starter/``.

Why one head per organ group (``body``, ``liver``, ``spleen``, ``kidneys``): a hospital
that annotates only the liver trains only the encoder and ``heads.liver``, so the hub
can merge each head across exactly the nodes that trained it (partial labels), and a
new structure is one more head on a frozen encoder (continual classes). Each head is a
softmax over its labels plus background; heads are combined by confidence, with the
enclosing ``body`` filling whatever no organ head claims.
"""

import os

# Idle OpenMP threads sleep instead of spinning. On a machine whose cores are shared
# (a hospital VM running the SCP, the database and the trainer), spinning threads make
# two-thread training up to ten times slower than one thread. libgomp reads this when
# torch is first imported, which importing any learning module triggers after this line.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
