"""The documented example configuration ``tessera node init`` writes (tests load it, so
it stays valid)."""

__all__ = ["EXAMPLE_CONFIG"]

EXAMPLE_CONFIG = """\
# Tessera node configuration. Every key may be overridden from the environment as
# TESSERA_<SECTION>__<KEY>, e.g. TESSERA_DICOM__PORT=11113.

[node]
# Where instance files, the quarantine and the SQLite index live.
data_dir = "var/node"
# Empty: SQLite (WAL) in data_dir. For several workers on several hosts use PostgreSQL:
# database_url = "postgresql+psycopg://tessera:secret@db.example/tessera"
database_url = ""
# The quarantine (refused payloads, kept for inspection) keeps at most this many
# entries and megabytes; the oldest are dropped (counted in `tessera node status`).
quarantine_max_files = 1000
quarantine_max_mb = 2048
# Disk watermark: with less free space than this on the instance store's file system,
# new instances are refused (0xA700 over DICOM, 503 over STOW-RS) before the disk is full.
min_free_mb = 512
min_free_percent = 1

[dicom]
ae_title = "TESSERA"
host = "127.0.0.1"        # 0.0.0.0 to accept from the network (then widen the allowlist)
port = 11112
max_associations = 10
# Receiving processes: more than one spreads concurrent associations over as many
# CPUs (one per core at most is a good start); each has its own intake journal under
# data_dir/intake, and max_associations is shared among them.
receivers = 1
network_timeout_s = 60
max_instance_mb = 1024    # larger datasets are refused with 0xA700
max_pdu_kb = 128          # the largest PDU the node receives (dcmtk sends up to 128)
# Hostile or broken peers: a connection must send its whole association request within
# association_timeout_s (then it is closed); at most max_connections_per_address at once
# from one address and max_connections in all; an association request over
# max_association_request_kb, or a P-DATA-TF PDU over max_pdu_kb (the negotiated
# maximum), is aborted before it is read. Refusals are logged and audited at most once
# per kind and address per limit_report_interval_s.
association_timeout_s = 10
max_connections_per_address = 16
max_connections = 64
listen_backlog = 128
max_association_request_kb = 256
limit_report_interval_s = 60
# DICOM TLS (optional; deploy/tls/make-certs.sh with DICOM_SERVER=... makes a pair).
# With tls_ca, peers must present a certificate signed by that CA.
# tls_cert = "deploy/tls/out/node1-dicom.pem"
# tls_key = "deploy/tls/out/node1-dicom.key"
# tls_ca = "deploy/tls/out/ca.pem"

# Who may associate: an AE title ("*" for any) from one of the networks.
# Nothing else gets in. This example allows loopback only.
[[dicom.allow]]
ae_title = "*"
networks = ["127.0.0.0/8", "::1/128"]

[assembler]
quiet_period_s = 5        # a series is complete after this long without new instances

[jobs]
lease_s = 60              # a crashed worker's job is taken over after its lease expires
heartbeat_s = 10
workers = 2

[export]
max_attempts = 8          # then the item is dead-lettered (see `tessera node status`)
backoff_initial_s = 2     # doubles after each failed attempt ...
backoff_max_s = 600       # ... up to this

# Destinations the node sends to with C-STORE.
[destinations.pacs]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242

# Routing rules: every rule whose criteria all match a completed series applies.
# action = "forward" sends the series unchanged; action = "segment" runs the model
# and sends the DICOM-SEG to the destinations. A series no rule matches is stored only.
# One rule per modality the node has a model for.
[[rules]]
name = "abdomen-ct"
action = "segment"
model = "tessera-abdomen-ct"  # shipped with the node
destinations = ["pacs"]
out_of_domain = "send"    # a SEG of input the model was not made for is marked
                          # "OUT OF DOMAIN?"; "hold" also keeps it from the destinations
[rules.match]
modality = ["CT"]
# body_part = ["ABDOMEN"]
# series_description = "(?i)abdomen|portal"
# calling_ae = ["PACS"]
# called_ae = ["TESSERA"]
# sop_class_uid = ["1.2.840.10008.5.1.4.1.1.2"]

[[rules]]
name = "head-mr"
action = "segment"
# Built on this node, never shipped (the AAL atlas licence): run once
#   tessera model bootstrap --data mr --config <this file>
# (about 9 minutes on 2 CPU cores; it writes <data_dir>/models/tessera-head-mr).
# Until then MR series are refused with that command as the reason.
model = "tessera-head-mr"
destinations = ["pacs"]
out_of_domain = "send"
[rules.match]
modality = ["MR"]

[inference]
device = "auto"           # auto (CUDA when there is one), cpu or cuda
amp = true                # float16 autocast for inference on CUDA
min_structure_fraction = 0.05  # out of domain below this: what the model segmented
                          # outside its largest label (the body), as a fraction; 0: off

[learning]
# Corrected SEGs (C-STORE or STOW-RS) become training samples; a round of local
# training replaces the serving model only if held-out Dice does not fall by more
# than acceptance_margin. `tessera model list-versions` / `rollback` manage versions.
device = "auto"           # where training rounds run: auto, cpu or cuda
annotated_labels = []     # labels this hospital corrects, e.g. ["liver"]; empty: all
train_every = 1           # train after every N corrections
keep_optimiser_state = true # Adam's moments carry over between rounds (stay local)
hub_round_l2sp = 1.0      # a federated update trained again from the hub generation is
                          # pulled toward it (FedProx); 0: off
validation_every = 5      # every 5th correction is held out for evaluation
acceptance_margin = 0.01

[learning.round]
# How a round trains (these keys sat directly under [learning] before; the old names
# still work for one release, with a warning).
epochs = 5
learning_rate = 0.001
time_budget_s = 50        # training steps stop here; with preparation a round is <= 60 s
# Against forgetting what the model already knew (no foreign data needed):
encoder_lr_scale = 0.01   # encoder learns at this fraction of learning_rate (heads: 1x)
distill_weight = 10.0     # keep heads close to the round's start where it was right
distill_other_heads = 1.0 # heads this site does not train keep their outputs (0: off)
l2sp_alpha = 0.0          # L2-SP pull toward the round's starting weights (0: off)

[learning.rehearsal]
# Anchor slices of this phantom site (the starter's origin), made on the node (no
# patient data), fill `fraction` of each batch; a round whose anchor Dice falls by more
# than `margin` is refused. site = "" turns rehearsal off.
site = "A"
fraction = 0.25
margin = 0.02

[http]
# DICOMweb (QIDO-RS, WADO-RS, STOW-RS) for OHIF at /dicomweb, /healthz and /status.
enabled = true
host = "127.0.0.1"
port = 8042               # 0: any free port
# sha256 hex digests of bearer tokens; `tessera node token` prints a new pair.
tokens = []
cors_origins = []         # OHIF served from another origin, e.g. ["https://ohif.example"]
max_stow_mb = 512
header_timeout_s = 10     # a request head must arrive within this, or the connection closes
max_connections = 64      # open HTTP connections at most; requests at the limit get 503
# ohif_dir = "deploy/ohif/vendor/dist"   # serve OHIF at / (deploy/ohif/fetch-ohif.sh)

[federation]
# Share what this node learns (weights only) with a hub; follow its generations.
enabled = false
hub = "hub.example:50051"
ca_cert = "deploy/tls/out/ca.pem"
cert = "deploy/tls/out/node1.pem"
key = "deploy/tls/out/node1.key"
enrolment_token = ""      # `tessera hub enrol`; used once, then credentials_path serves
# credentials_path = "var/node/federation/credentials.json"
model = "tessera-abdomen-ct"
upload_interval_s = 30    # pending updates are retried with backoff, never dropped
metrics_interval_s = 300  # de-identified quality figures and correction Dice
evaluate = true           # score the hub's candidates on held-out corrected cases
evaluation_interval_s = 15  # a candidate waits for every node taking part to answer
adapt = true              # serve a short fine-tune of each hub generation on this site's
adapt_epochs = 3          # corrections; keep the previous version if a generation is
adapt_time_budget_s = 30  # worse here (held-out Dice) by more than acceptance_margin

# Extra models by name (the shipped starter "tessera-abdomen-ct" needs no entry):
# [models]
# my-model = "/srv/tessera/models/my-model.safetensors"

# [[rules]]
# name = "forward-us"
# action = "forward"
# destinations = ["pacs"]
# quiet_period_s = 10
# [rules.match]
# modality = ["US"]
"""
