"""The fully commented configuration file that ``fednode init`` writes.

``deploy/fednode.example.toml`` is this template rendered with its defaults (a test keeps the
two equal).
"""

from __future__ import annotations

from collections.abc import Sequence

TEMPLATE = """\
# fednode configuration (TOML).
#
# Every key can also be set with an environment variable: FEDNODE_<SECTION>__<KEY>, for example
# FEDNODE_DICOM__PORT=11112. Relative paths are relative to this file's folder.
# Check the effective configuration with `fednode config show` (secrets are masked).

[node]
# This node's AE title (1-16 characters). Peers must call it exactly.
ae_title = "{ae_title}"
# Folder for the database (SQLite default), the encrypted spool and the de-identified blobs.
data_dir = "{data_dir}"
# The master secret: 32 random bytes, mode 0600. Every key is derived from it. Back it up:
# without it nothing encrypted can be read and pseudonyms change. Default: <data_dir>/master.key
# secret_file = "/etc/fednode/master.key"

[dicom]
# Address and port the storage SCP listens on.
host = "{host}"
port = {port}
# Associations served at once, over all SCP processes.
max_associations = 16
# Largest PDU the node receives, bytes (0 = unlimited). Larger PDUs cost less CPU per instance.
max_pdu = 1048576
# Timeouts, seconds: association set-up, DIMSE messages, idle connection.
acse_timeout = 30
dimse_timeout = 60
network_timeout = 60
# SCP processes sharing the port (0 = one per CPU core).
processes = 0
# Refuse stores with status 0xA700 when the data volume has less free space than this, MiB.
free_space_floor_mb = 1024
# On SIGTERM, seconds to let in-flight associations and jobs finish.
shutdown_grace_seconds = 30
# Peers are not trusted before they associate: a new connection has first_pdu_timeout s to
# send its A-ASSOCIATE-RQ, every PDU must arrive within pdu_timeout s of its first byte, and
# at most max_pending_connections connections may wait unassociated (0 = half of
# max_associations; beyond it the oldest is closed).
first_pdu_timeout = 10
pdu_timeout = 30
max_pending_connections = 0
# Largest instance received, and largest a deflated one may inflate to, MiB (beyond: 0xA700).
max_instance_mb = 1024
max_inflated_mb = 256

# Peers allowed to associate (default-deny). One [[dicom.peers]] block per calling AE title;
# `host` pins it to an IP address or host name; `port` is the peer's own SCP port (used to send
# results back).
{peers}
[database]
# Empty: SQLite in data_dir (embedded default). Production: PostgreSQL, e.g.
# url = "postgresql+psycopg://fednode@db.hospital.internal/fednode"
url = ""

[workers]
# Attempts before a job is dead-lettered (see `fednode status`, `fednode jobs retry`).
max_attempts = 5
# First retry delay in seconds; it doubles on every attempt up to backoff_max_seconds.
backoff_seconds = 10
backoff_max_seconds = 3600
# Seconds a worker holds a job before another may take it over (extended while it runs).
lease_seconds = 300
# CPU priority of the worker processes (nice 0-19): on a busy CPU the DICOM receiver goes
# first, so a burst from the PACS is answered at full speed while de-identification catches
# up. 0 = same priority as the receiver.
nice = 10
# While the receiver is committing (a burst from the PACS), workers run under
# SCHED_IDLE: only on CPU time the receiver leaves idle. false = always at `nice`.
idle_while_receiving = true
# While the receiver is committing, workers start no new job until it pauses (30 ms without a
# commit): on two cores any work beside the receiver slows it. They wait at most this many
# seconds behind it (a PACS that never pauses), then run beside it as above. 0 = never wait.
defer_while_receiving_seconds = 10

# Lanes: each lane's worker processes serve only its job kinds, so a slow kind (an encrypted
# inference round trip, a PACS that is slow to accept a report) never holds up
# de-identification. Every kind belongs to exactly one lane; count = 0 keeps a lane's jobs
# queued. `fednode serve --workers N` runs N processes in every lane.
[workers.lanes.ingest]
kinds = ["deidentify", "assemble"]
count = 2

[workers.lanes.results]
kinds = ["infer", "report", "export"]
count = 1

[spool]
# Hours the encrypted spool record of a rejected instance is kept (for investigation).
reject_retention_hours = 72

[deid]
# De-identification: DICOM PS3.15 Annex E Basic Profile (Table E.1-1) plus these options. The
# options in force are recorded in every output (De-identification Method Code Sequence).
# Dates: "modified" shifts every date of a patient by a keyed per-patient offset (intervals
# survive), "full" keeps dates, "off" removes them.
longitudinal = "modified"
retain_patient_characteristics = false
retain_device_identity = false
retain_institution_identity = false
retain_safe_private = false
retain_uids = false
clean_descriptors = false
clean_structured_content = false
clean_graphics = false
# Prefix of the pseudonymous Patient ID / Patient's Name.
patient_prefix = "FN"
# Range of the per-patient date shift, days.
date_shift_days = [-3650, -365]
# Modalities taken to carry burned-in text when Burned In Annotation is absent. Such instances
# (and any with Burned In Annotation YES) are admitted only if a pixel rule matches them.
burned_in_modalities = ["US", "SC", "OT", "XC", "ES", "DOC"]
# A pixel rule blacks out rectangles [x, y, width, height] in every frame of matching images:
# [[deid.pixel_rules]]
# name = "vendor X ultrasound header bar"
# manufacturer = "VendorX"
# model = "Sono 5"
# modality = "US"
# rows = 480
# columns = 640
# rectangles = [[0, 0, 640, 40]]

[tasks]
# AI tasks (plugins): built-in names or "package.module:attr" references.
enabled = ["chest_xray"]
# A study is complete (and its tasks run) after no instance arrived for this many seconds.
quiet_period_seconds = 300

[inference]
# The model owner's encrypted-inference service (only ciphertexts are sent to it) and the file
# with this node's token (issued by the service's administrator: `fednode inference-server
# token issue NODE`). Without them, "infer" jobs retry with backoff and end as dead letters
# after workers.max_attempts (`fednode jobs retry --all` requeues them once configured).
# server = "https://models.example.org:8443"
# token_file = "/etc/fednode/inference.token"
# A new CKKS key per task after this many days (results keep the id of their key).
key_rotation_days = 30

[export]
# Structured Reports (DICOM TID 1500) of each result, sent back to the PACS by C-STORE, filed
# under the original patient and study. "comprehensive-3d" (Comprehensive 3D SR) or "enhanced"
# (Enhanced SR, for a PACS that does not store Comprehensive 3D SR).
sr_format = "comprehensive-3d"
# C-STORE attempts per destination before the delivery is dead-lettered (retry delays follow
# backoff_seconds of the workers section, doubling); `fednode exports retry` re-queues them.
max_attempts = 12
# Association and DIMSE timeout towards a destination, seconds.
timeout_seconds = 30
# Hours an acknowledged SR stays in the encrypted outbox before it is deleted.
retention_hours = 72
# Where reports go: one block per destination, with ae_title, host and port, or with
# peer = the AE title of a [[dicom.peers]] entry that has host and port. None: reports stay in
# the encrypted outbox.
# [[export.destinations]]
# name = "pacs"
# ae_title = "PACS"
# host = "10.0.0.5"
# port = 104

[federation]
# Flower federated learning (`fednode federation enroll|join|approve`). The SuperLink address
# and CA are recorded by `enroll` under <data_dir>/federation/. Loopback port of the SuperNode's
# Runtime API (where fednode's approval-gated executor takes the ClientApp tasks):
runtime_port = 9094
# Local DP: Gaussian noise of this multiple of the coordinator's clipping norm on every update
# before it leaves the node (0 = off; the coordinator's central DP is separate).
local_dp_noise_multiplier = 0.0

[logging]
# DEBUG, INFO, WARNING or ERROR; format "text" or "json". Logs never contain patient data.
level = "INFO"
format = "text"
"""

PEER_BLOCK = """[[dicom.peers]]
ae_title = "{ae_title}"
{host_line}{port_line}"""


def render(
    *,
    ae_title: str = "FEDNODE",
    data_dir: str = "fednode-data",
    host: str = "0.0.0.0",
    port: int = 11112,
    peers: Sequence[tuple[str, str | None] | tuple[str, str | None, int | None]] | None = None,
) -> str:
    """The commented config with these values filled in (peers as ``(ae, host)`` or
    ``(ae, host, port)``; values already validated)."""
    blocks = []
    for peer in peers or []:
        peer_ae, peer_host = peer[0], peer[1]
        peer_port = peer[2] if len(peer) > 2 else None
        host_line = f'host = "{peer_host}"\n' if peer_host else ""
        port_line = f"port = {peer_port}\n" if peer_port else ""
        blocks.append(
            PEER_BLOCK.format(ae_title=peer_ae, host_line=host_line, port_line=port_line)
        )
    if not blocks:
        blocks.append('# [[dicom.peers]]\n# ae_title = "PACS"\n# host = "10.0.0.5"\n# port = 104\n')
    return TEMPLATE.format(
        ae_title=ae_title, data_dir=data_dir, host=host, port=port, peers="\n".join(blocks)
    )
