"""The node's configuration: one typed :class:`Settings` object.

Sources, lowest precedence first: the TOML file (``--config``, default ``./fednode.toml``, then
``/etc/fednode/fednode.toml``), then ``FEDNODE_*`` environment variables (nested keys joined by
``__``, for example ``FEDNODE_DICOM__PORT=11112``), then CLI flags. Relative paths in the file are
resolved against the file's folder. A bad value raises :class:`~node.errors.ConfigError` naming
the key, the value and the fix; secrets never appear in ``repr`` or in ``fednode config show``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from node.errors import ConfigError

DEFAULT_CONFIG_PATHS = (Path("fednode.toml"), Path("/etc/fednode/fednode.toml"))
ENV_CONFIG = "FEDNODE_CONFIG"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash


def _check_ae_title(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError("an AE title is 1-16 printable ASCII characters, not all spaces, no '\\'")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    ae_title: str = Field("FEDNODE", description="this node's AE title (1-16 characters)")
    data_dir: Path = Field(
        Path("fednode-data"), description="folder for the database, spool and blobs"
    )
    secret_file: Path | None = Field(
        None, description="path of the master secret (default: <data_dir>/master.key)"
    )

    _ae = field_validator("ae_title")(_check_ae_title)


class Peer(_Section):
    """A DICOM peer allowed to associate (default-deny)."""

    ae_title: str = Field(description="the peer's calling AE title")
    host: str | None = Field(
        None, description="pin the peer to this IP address or host name (optional)"
    )
    port: int | None = Field(None, ge=1, le=65535, description="the peer's own SCP port (optional)")
    description: str = ""

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value or any(c.isspace() for c in value) or "@" in value or "/" in value:
            raise ValueError("a host is an IP address or a host name, e.g. 10.0.0.5")
        if ":" in value:
            import ipaddress

            try:
                ipaddress.IPv6Address(value.strip("[]"))
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an IP address or host name; write the port apart "
                    "(port = 104), not as HOST:PORT"
                ) from None
            return value.strip("[]")
        return value


class DicomSection(_Section):
    host: str = Field("0.0.0.0", description="address the SCP listens on")
    port: int = Field(11112, ge=1, le=65535, description="TCP port the SCP listens on (1-65535)")
    max_associations: int = Field(
        16, ge=1, le=1024, description="associations served at once, over all processes"
    )
    max_pdu: int = Field(
        1048576,
        ge=0,
        description="maximum PDU length the node receives, bytes (0 = unlimited; min 4096)",
    )
    acse_timeout: float = Field(30.0, gt=0, description="seconds to wait for association messages")
    dimse_timeout: float = Field(60.0, gt=0, description="seconds to wait for DIMSE messages")
    network_timeout: float = Field(60.0, gt=0, description="seconds an idle connection may stay")
    processes: int = Field(
        0, ge=0, le=64, description="SCP processes sharing the port (0 = one per CPU core)"
    )
    free_space_floor_mb: int = Field(
        1024, ge=0, description="refuse stores (0xA700) when the data volume has less free MiB"
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="seconds SIGTERM waits for in-flight associations"
    )
    first_pdu_timeout: float = Field(
        10.0, gt=0,
        description="seconds a new connection has to send its A-ASSOCIATE-RQ (PS3.8 ARTIM)",
    )
    pdu_timeout: float = Field(
        30.0, gt=0, description="seconds one PDU may take from its first byte to its last"
    )
    max_pending_connections: int = Field(
        0, ge=0, le=1024,
        description="connections not yet associated, over all processes; the oldest is "
        "closed beyond it (0 = half of max_associations)",
    )
    max_instance_mb: int = Field(
        1024, ge=1, description="largest instance received, MiB (larger: refused, 0xA700)"
    )
    max_inflated_mb: int = Field(
        256, ge=1,
        description="largest size a deflated instance may inflate to, MiB (larger: refused)",
    )
    peers: list[Peer] = Field(
        default_factory=list, description="[[dicom.peers]] entries allowed to associate"
    )

    @field_validator("max_pdu")
    @classmethod
    def _pdu(cls, value: int) -> int:
        if value and value < 4096:
            raise ValueError("max_pdu is 0 (unlimited) or at least 4096")
        return value

    @model_validator(mode="after")
    def _pending(self) -> DicomSection:
        if self.max_pending_connections > self.max_associations:
            raise ValueError(
                "max_pending_connections must not exceed max_associations (0 = automatic)"
            )
        return self

    @property
    def pending_connections(self) -> int:
        """The cap on connections that have not associated yet, over all processes."""
        return self.max_pending_connections or max(1, self.max_associations // 2)


class DatabaseSection(_Section):
    url: str = Field(
        "",
        description="SQLAlchemy URL: empty = SQLite in data_dir, or postgresql+psycopg://user@host/db",
    )
    busy_timeout_ms: int = Field(10000, ge=0, description="SQLite lock wait, milliseconds")
    pool_size: int = Field(5, ge=1, description="connections per process (PostgreSQL)")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        check_database_url(value)
        return value.strip()


_SUPPORTED_DATABASES = (
    "fednode stores its data in SQLite (leave url empty, or sqlite:///PATH) or PostgreSQL "
    "(postgresql+psycopg://USER@HOST:PORT/DB)"
)


def check_database_url(url: str) -> None:
    """Refuse a database URL fednode cannot use, saying which form it takes.

    The message never repeats the URL (it may hold a password).
    """
    url = url.strip()
    if not url:
        return
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL (no '://'); {_SUPPORTED_DATABASES}")
    backend, _, driver = scheme.lower().partition("+")
    if backend in ("postgres", "postgresql"):
        if backend == "postgres" or driver != "psycopg":
            raise ValueError(
                f"write PostgreSQL URLs as postgresql+psycopg://… (the psycopg 3 driver fednode "
                f"installs), not {scheme}://…"
            )
    elif backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise ValueError(f"SQLite URLs are sqlite:///PATH, not {scheme}://…")
    else:
        raise ValueError(f"{scheme}:// is not supported: {_SUPPORTED_DATABASES}")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError(f"the URL cannot be parsed; {_SUPPORTED_DATABASES}") from None
    try:
        parsed.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise ValueError("the port in the URL is not a number") from None


_JOB_KINDS = ("deidentify", "assemble", "infer", "report", "export")
"""The job kinds (``node.jobs.JobKind``; listed here so that config does not import the jobs)."""
_LANE_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class LaneSection(_Section):
    """One lane: worker processes that serve only these job kinds."""

    kinds: list[str] = Field(description="job kinds this lane serves")
    count: int = Field(1, ge=0, le=64, description="worker processes of this lane (0 = none)")

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        unknown = [k for k in value if k not in _JOB_KINDS]
        if unknown or not value:
            raise ValueError(
                f"job kinds must be a non-empty list of {', '.join(_JOB_KINDS)}"
                + (f" (unknown: {', '.join(map(repr, unknown))})" if unknown else "")
            )
        return value


def _default_lanes() -> dict[str, LaneSection]:
    return {
        "ingest": LaneSection(kinds=["deidentify", "assemble"], count=2),
        "results": LaneSection(kinds=["infer", "report", "export"], count=1),
    }


class WorkersSection(_Section):
    lanes: dict[str, LaneSection] = Field(
        default_factory=_default_lanes,
        description="worker lanes: [workers.lanes.<name>] with kinds = [...] and count = N",
    )
    lease_seconds: float = Field(300.0, gt=0, description="how long a leased job stays reserved")
    max_attempts: int = Field(5, ge=1, description="attempts before a job is dead-lettered")
    backoff_seconds: float = Field(10.0, ge=0, description="first retry delay (doubles each try)")
    backoff_max_seconds: float = Field(3600.0, ge=0, description="longest retry delay")
    poll_seconds: float = Field(0.5, gt=0, description="idle wait between queue polls")
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU priority of worker processes (nice, 0-19): the SCP's association "
        "threads go first on a busy CPU; 0 = same as the SCP",
    )
    idle_while_receiving: bool = Field(
        True,
        description="while the SCP is receiving, workers run under SCHED_IDLE: only "
        "on CPU time the receiver leaves idle; false = always at workers.nice",
    )
    defer_while_receiving_seconds: float = Field(
        10.0,
        ge=0,
        description="while the SCP is receiving, workers start no job until it pauses, for "
        "at most this many seconds of falling behind (then they share the CPU under "
        "workers.idle_while_receiving); 0 = never wait",
    )

    @field_validator("lanes")
    @classmethod
    def _lanes_cover_every_kind_once(cls, lanes: dict[str, LaneSection]) -> dict[str, LaneSection]:
        owner: dict[str, str] = {}
        for name, lane in lanes.items():
            if not _LANE_NAME_RE.match(name):
                raise ValueError(f"lane name {name!r}: lower-case letters, digits, '-', '_'")
            for kind in lane.kinds:
                if kind in owner:
                    raise ValueError(
                        f"job kind {kind!r} is in lanes {owner[kind]!r} and {name!r}; "
                        "put each kind in one lane"
                    )
                owner[kind] = name
        missing = [k for k in _JOB_KINDS if k not in owner]
        if missing:
            raise ValueError(
                f"no lane serves job kind(s) {', '.join(missing)}; add them to a lane's kinds "
                "(a lane with count = 0 keeps them queued)"
            )
        return lanes

    @property
    def count(self) -> int:
        """Worker processes over all lanes."""
        return sum(lane.count for lane in self.lanes.values())

    def with_count(self, count: int) -> WorkersSection:
        """The same lanes with *count* worker processes each (``serve --workers``)."""
        lanes = {n: lane.model_copy(update={"count": count}) for n, lane in self.lanes.items()}
        return self.model_copy(update={"lanes": lanes})


class SpoolSection(_Section):
    reject_retention_hours: float = Field(
        72.0, ge=0, description="hours a rejected instance's encrypted spool record is kept"
    )


_TASK_REF_RE = re.compile(
    r"^(?:[a-z][a-z0-9_]{0,31}|[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)$"
)


class TasksSection(_Section):
    """The AI tasks this node runs (plugins) and how studies are assembled for them."""

    enabled: list[str] = Field(
        default_factory=lambda: ["chest_xray"],
        description='task plugins: built-in names ("chest_xray") or "package.module:attr"',
    )
    quiet_period_seconds: float = Field(
        default=300.0,
        ge=0,
        description="a study is complete when no instance arrived for this many seconds",
    )
    sweep_seconds: float = Field(
        default=15.0, gt=0, description="how often a worker looks for studies that became complete"
    )
    models_dir: Path | None = Field(
        default=None, description="folder of trained model artifacts (default: <data_dir>/models)"
    )

    @field_validator("enabled")
    @classmethod
    def _refs(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for ref in value:
            if not _TASK_REF_RE.match(ref):
                raise ValueError(
                    f"{ref!r} is neither a task name (lower-case, digits, '_', at most 32) nor "
                    'a "package.module:attr" reference'
                )
            if ref in seen:
                raise ValueError(f"{ref!r} is listed twice")
            seen.add(ref)
        return value


_DEST_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class ExportDestination(_Section):
    """A DICOM Storage SCP (the PACS) that receives the node's Structured Reports.

    Give either ``ae_title``, ``host`` and ``port``, or ``peer``: the AE title of a
    ``[[dicom.peers]]`` entry whose ``host`` and ``port`` are used.
    """

    name: str | None = Field(
        None, description="a short name for listings (a-z 0-9 _ -; default: the AE title)"
    )
    ae_title: str | None = Field(None, description="the destination's called AE title")
    host: str | None = Field(None, description="the destination's IP address or host name")
    port: int | None = Field(None, ge=1, le=65535, description="the destination's DICOM port")
    peer: str | None = Field(
        None, description="use the host and port of the [[dicom.peers]] entry with this AE title"
    )
    calling_ae: str | None = Field(
        None, description="calling AE title towards this destination (default: node.ae_title)"
    )

    @field_validator("ae_title", "peer", "calling_ae")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _DEST_NAME_RE.match(value):
            raise ValueError("a destination name is 1-32 characters of a-z, 0-9, '_' and '-'")
        return value


class ExportSection(_Section):
    """Structured Reports back to the PACS: format, destinations, retries, outbox retention."""

    sr_format: Literal["comprehensive-3d", "enhanced"] = Field(
        "comprehensive-3d",
        description="SR storage class: 'comprehensive-3d' (default) or 'enhanced'",
    )
    destinations: list[ExportDestination] = Field(
        default_factory=list,
        description="[[export.destinations]]: where reports are sent (none = kept in the outbox)",
    )
    max_attempts: int = Field(
        12,
        ge=1,
        description=(
            "C-STORE attempts per destination before the export is dead-lettered (retry delays "
            "follow [workers] backoff_seconds, doubling, capped at backoff_max_seconds)"
        ),
    )
    timeout_seconds: float = Field(
        30.0, gt=0, description="association and DIMSE timeout towards a destination, seconds"
    )
    retention_hours: float = Field(
        72.0, ge=0, description="hours an acknowledged SR stays in the encrypted outbox"
    )
    sweep_seconds: float = Field(
        2.0, gt=0, description="how often a worker looks for new results to report"
    )


_PRIVATE_TAG_RE = re.compile(r"^\(?([0-9A-Fa-f]{4}),\s*[xX]{2}([0-9A-Fa-f]{2})\)?$")
_PREFIX_RE = re.compile(r"^[A-Z0-9_-]{0,16}$")


class SafePrivateTag(_Section):
    """A private attribute known not to identify anyone (PS3.15 E.3.10, Table E.3.10-1)."""

    creator: str = Field(description="the Private Creator of the block, e.g. 'GEMS_PARM_01'")
    tag: str = Field(description="group and element in the block as 'gggg,xxee' (odd group)")

    @field_validator("creator")
    @classmethod
    def _creator(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 64:
            raise ValueError("a private creator is 1-64 characters")
        return value

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        match = _PRIVATE_TAG_RE.match(value.strip())
        if match is None or int(match.group(1), 16) % 2 == 0:
            raise ValueError(
                "a private tag is written 'gggg,xxee' with an odd group, e.g. '0043,xx39'"
            )
        return f"{match.group(1).upper()},xx{match.group(2).upper()}"

    @property
    def group(self) -> int:
        return int(self.tag[:4], 16)

    @property
    def element(self) -> int:
        """The element's offset within its private block (the ``ee`` of ``gggg,xxee``)."""
        return int(self.tag[-2:], 16)


class PixelRule(_Section):
    """Where burned-in text sits for one kind of image, and the rectangles to black out.

    Every field that is set must match the instance (text compared case-insensitively after
    stripping); an unset field matches anything. Rectangles are ``[x, y, width, height]`` in
    pixels, applied to every frame.
    """

    name: str = Field(default="", description="a label for the rule, shown in audit records")
    manufacturer: str | None = Field(default=None, description="Manufacturer (0008,0070)")
    model: str | None = Field(default=None, description="Manufacturer's Model Name (0008,1090)")
    modality: str | None = Field(default=None, description="Modality (0008,0060)")
    rows: int | None = Field(default=None, ge=1, description="Rows (0028,0010)")
    columns: int | None = Field(default=None, ge=1, description="Columns (0028,0011)")
    rectangles: list[tuple[int, int, int, int]] = Field(
        min_length=1, description="[[x, y, width, height], ...] to black out, in pixels"
    )

    @field_validator("rectangles")
    @classmethod
    def _rects(cls, value: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
        for x, y, w, h in value:
            if x < 0 or y < 0 or w <= 0 or h <= 0:
                raise ValueError("a rectangle is [x, y, width, height], x, y >= 0, w, h > 0")
        return value


def _default_safe_private() -> list[SafePrivateTag]:
    # A few well-known entries of PS3.15 Table E.3.10-1 (diffusion b-values and directions).
    pairs = [
        ("SIEMENS MR HEADER", "0019,xx0C"),
        ("SIEMENS MR HEADER", "0019,xx0E"),
        ("SIEMENS MR HEADER", "0019,xx27"),
        ("GEMS_PARM_01", "0043,xx39"),
        ("GEMS_ACQU_01", "0019,xx23"),
        ("Philips Imaging DD 001", "2001,xx03"),
    ]
    return [SafePrivateTag(creator=c, tag=t) for c, t in pairs]


class DeidSection(_Section):
    """De-identification: DICOM PS3.15 Annex E Basic Profile and the options an admin turns on."""

    longitudinal: Literal["modified", "full", "off"] = Field(
        default="modified",
        description=(
            "Retain Longitudinal Temporal Information: 'modified' (dates shifted per patient), "
            "'full' (dates kept) or 'off' (dates removed)"
        ),
    )
    retain_patient_characteristics: bool = Field(
        default=False, description="Retain Patient Characteristics Option (sex, age, weight ...)"
    )
    retain_device_identity: bool = Field(
        default=False, description="Retain Device Identity Option (serial numbers, stations ...)"
    )
    retain_institution_identity: bool = Field(
        default=False, description="Retain Institution Identity Option (name, address ...)"
    )
    retain_safe_private: bool = Field(
        default=False, description="Retain Safe Private Option (keeps the safe_private list)"
    )
    retain_uids: bool = Field(default=False, description="Retain UIDs Option (original UIDs)")
    clean_descriptors: bool = Field(
        default=False, description="Clean Descriptors Option (descriptions kept, cleaned)"
    )
    clean_structured_content: bool = Field(
        default=False, description="Clean Structured Content Option (SR content kept, cleaned)"
    )
    clean_graphics: bool = Field(
        default=False, description="Clean Graphics Option (graphic annotations kept, cleaned)"
    )
    patient_prefix: str = Field(
        default="FN", description="prefix of the pseudonymous Patient ID / Name (A-Z 0-9 _ -)"
    )
    date_shift_days: tuple[int, int] = Field(
        default=(-3650, -365),
        description="[min, max] days added to every date of a patient (keyed per-patient pick)",
    )
    safe_private: list[SafePrivateTag] = Field(
        default_factory=_default_safe_private,
        description="[[deid.safe_private]] entries kept by retain_safe_private",
    )
    burned_in_modalities: list[str] = Field(
        default_factory=lambda: ["US", "SC", "OT", "XC", "ES", "DOC"],
        description="modalities taken to carry burned-in text when Burned In Annotation is absent",
    )
    pixel_rules: list[PixelRule] = Field(
        default_factory=list,
        description="[[deid.pixel_rules]]: header signature -> rectangles to black out",
    )

    @field_validator("patient_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _PREFIX_RE.match(value):
            raise ValueError("the prefix is 0-16 characters of A-Z, 0-9, '_' and '-'")
        return value

    @field_validator("date_shift_days")
    @classmethod
    def _shift(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if low > high or max(abs(low), abs(high)) > 36500:
            raise ValueError("[min, max] with min <= max, within +-36500 days")
        return value

    @field_validator("burned_in_modalities")
    @classmethod
    def _modalities(cls, value: list[str]) -> list[str]:
        return [m.strip().upper() for m in value if m.strip()]


class InferenceSection(_Section):
    """Encrypted inference: the model owner's service this node sends ciphertexts to."""

    server: str | None = Field(
        default=None,
        description='URL of the inference service, e.g. "https://models.example.org:8443"',
    )
    token_file: Path | None = Field(
        default=None,
        description="file holding this node's token for the service (mode 0600; "
        "issued by the service's administrator)",
    )
    ca_file: Path | None = Field(
        default=None, description="CA bundle to verify the service's TLS certificate"
    )
    timeout_seconds: float = Field(
        default=120.0, gt=0, description="longest wait for one service request"
    )
    key_rotation_days: float = Field(
        default=30.0, gt=0, description="a new CKKS key per task after this many days"
    )

    @field_validator("server")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="one of DEBUG, INFO, WARNING, ERROR"
    )
    format: Literal["text", "json"] = Field("text", description="text or json")


class FederationSection(_Section):
    """How the node takes part in a Flower federation (``fednode federation ...``).

    Where the federation is (SuperLink address, CA certificate, site name) is recorded by
    ``fednode federation enroll`` under ``<data_dir>/federation/``; this section holds the
    operator's choices for running the SuperNode.
    """

    runtime_port: int = Field(
        9094, ge=1, le=65535, description="loopback port of the SuperNode's Runtime API"
    )
    local_dp_noise_multiplier: float = Field(
        0.0,
        ge=0.0,
        description="local DP: Gaussian noise (times the clipping norm) added to each update "
        "on the node before it leaves (0 = off)",
    )
    restart_delay_seconds: float = Field(
        2.0, gt=0, description="first delay before restarting a failed SuperNode (doubles)"
    )
    restart_delay_max_seconds: float = Field(
        60.0, gt=0, description="longest delay between SuperNode restarts"
    )
    max_wait_seconds: float | None = Field(
        None, gt=0, description="SuperNode: give up connecting to the SuperLink after this long"
    )


class Settings(BaseSettings):
    """Everything the node is configured with. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="FEDNODE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    node: NodeSection = NodeSection()
    dicom: DicomSection = DicomSection()
    database: DatabaseSection = DatabaseSection()
    workers: WorkersSection = WorkersSection()
    spool: SpoolSection = SpoolSection()
    logging: LoggingSection = LoggingSection()
    deid: DeidSection = DeidSection()
    tasks: TasksSection = TasksSection()
    export: ExportSection = ExportSection()
    inference: InferenceSection = InferenceSection()
    federation: FederationSection = FederationSection()

    source_file: Path | None = Field(None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = _TOML_FILE.get("path")
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    # -- derived paths -------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    @property
    def secret_path(self) -> Path:
        return self.node.secret_file or self.node.data_dir / "master.key"

    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def blob_dir(self) -> Path:
        return self.node.data_dir / "blobs"

    @property
    def outbox_dir(self) -> Path:
        return self.node.data_dir / "outbox"

    @property
    def models_dir(self) -> Path:
        return self.tasks.models_dir or self.node.data_dir / "models"

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.node.data_dir / 'fednode.db'}"

    @property
    def scp_processes(self) -> int:
        return self.dicom.processes or (os.cpu_count() or 1)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict for display, with passwords in URLs masked."""
        data = self.model_dump(mode="json")
        data["database"]["url"] = redact_url(self.database_url)
        return data


# The TOML path travels to settings_customise_sources through this holder (pydantic-settings
# builds the sources inside the class); load_settings sets it for the duration of one load.
_TOML_FILE: dict[str, Path | None] = {"path": None}


def redact_url(url: str) -> str:
    """Mask the password of a database URL: in its user info and in a ``password=`` (or
    ``sslpassword=``) query parameter (libpq accepts both)."""
    url = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)
    return re.sub(r"(?i)([?&](?:ssl)?password=)[^&#]*", r"\1***", url)


def find_config(explicit: Path | None) -> Path | None:
    """The config file: *explicit*, ``$FEDNODE_CONFIG``, or the first default that exists."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file {explicit} does not exist; run `fednode init` first")
        return explicit
    env = os.environ.get(ENV_CONFIG)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"{ENV_CONFIG}={env} names no file; fix the variable or unset it")
        return path
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.is_file():
            return candidate
    return None


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Load the settings: TOML file, then ``FEDNODE_*`` environment, then *overrides*.

    Raises
    ------
    ConfigError
        Naming the key, the offending value and the fix.
    """
    path = find_config(config)
    _TOML_FILE["path"] = path
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    except ValueError as exc:  # TOML syntax errors and the like
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    finally:
        _TOML_FILE["path"] = None
    return _resolve_paths(settings, path)


def _resolve_paths(settings: Settings, path: Path | None) -> Settings:
    base = path.parent.resolve() if path is not None else Path.cwd()
    node = settings.node
    data_dir = node.data_dir if node.data_dir.is_absolute() else base / node.data_dir
    secret = node.secret_file
    if secret is not None and not secret.is_absolute():
        secret = base / secret
    new_node = node.model_copy(update={"data_dir": data_dir, "secret_file": secret})
    tasks = settings.tasks
    if tasks.models_dir is not None and not tasks.models_dir.is_absolute():
        tasks = tasks.model_copy(update={"models_dir": base / tasks.models_dir})
    return settings.model_copy(update={"node": new_node, "tasks": tasks, "source_file": path})


def _field_description(loc: tuple[Any, ...]) -> str:
    model: Any = Settings
    desc = ""
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            break
        info = fields[part]
        desc = info.description or ""
        model = info.annotation
    return desc


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f"in {path}" if path else "in the configuration"
    lines = [f"invalid configuration {where}:"]
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        key = ".".join(str(p) for p in loc)
        value = err.get("input")
        shown = "(missing)" if err.get("type") == "missing" else repr(value)
        if "url" in key or "password" in key or "secret" in key:
            shown = "(redacted)"
        if err.get("type") == "extra_forbidden":
            fix = "remove it (unknown key) or check its spelling"
        else:
            desc = _field_description(loc)
            fix = f"expected {desc}" if desc else "correct the value"
        env = "FEDNODE_" + "__".join(str(p).upper() for p in loc if not isinstance(p, int))
        lines.append(
            f"  {key} = {shown}: {err.get('msg')}; fix: {fix} "
            f"(in the file, or with the environment variable {env})"
        )
    return "\n".join(lines)


# -- values from the command line ------------------------------------------------------------
# CLI flags go through the same models as the file: a flag's error names the flag.


def _describe_flags(exc: ValidationError, section: str, flags: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        field = str(loc[0]) if loc else ""
        flag = flags.get(field, f"{section}.{field}")
        desc = _field_description((section, *loc))
        fix = f"; expected {desc}" if desc else ""
        lines.append(f"{flag} {err.get('input')!r}: {err.get('msg')}{fix}")
    return "invalid option " + "; ".join(lines)


def validated_section(
    section: str, values: Mapping[str, Any], flags: Mapping[str, str] | None = None
) -> Any:
    """Build the ``[section]`` model from *values*, as the file's values are validated.

    Raises
    ------
    ConfigError
        Naming the flag (from *flags*, field name -> ``--flag``) and what it expects.
    """
    model = Settings.model_fields[section].annotation
    assert isinstance(model, type) and issubclass(model, BaseModel)
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        raise ConfigError(_describe_flags(exc, section, flags or {})) from None


def apply_overrides(
    settings: Settings, overrides: Mapping[str, Any], flags: Mapping[str, str]
) -> Settings:
    """*settings* with ``"section.key": value`` overrides (``None`` values ignored), each
    validated like the file's value; *flags* maps ``"section.key"`` to the flag's name."""
    by_section: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        by_section.setdefault(section, {})[key] = value
    updates: dict[str, Any] = {}
    problems: list[str] = []
    for section, values in by_section.items():
        current: BaseModel = getattr(settings, section)
        merged = {**current.model_dump(), **values}
        names = {
            dotted.partition(".")[2]: flag
            for dotted, flag in flags.items()
            if dotted.startswith(section + ".")
        }
        try:
            updates[section] = validated_section(section, merged, names)
        except ConfigError as exc:
            problems.append(str(exc).removeprefix("invalid option "))
    if problems:
        raise ConfigError("invalid option " + "; ".join(problems))
    return settings.model_copy(update=updates) if updates else settings


def parse_peer(text: str) -> Peer:
    """Parse a ``--peer`` value: ``AE``, ``AE@HOST`` or ``AE@HOST:PORT`` (IPv6 in brackets:
    ``AE@[::1]:104``).

    Raises
    ------
    ConfigError
        If the form is not one of these, or the AE title, host or port is invalid.
    """
    forms = "AE, AE@HOST or AE@HOST:PORT (IPv6: AE@[ADDR]:PORT), e.g. PACS@10.0.0.5:104"
    ae, at, rest = text.strip().partition("@")
    host: str | None = None
    port: str | None = None
    if at:
        if rest.startswith("["):
            addr, bracket, tail = rest[1:].partition("]")
            if not bracket or (tail and not tail.startswith(":")):
                raise ConfigError(f"--peer {text!r}: not {forms}")
            host, port = addr, (tail[1:] if tail else None)
        elif rest.count(":") > 1:  # a bare IPv6 address, no port
            host = rest
        else:
            host, colon, port_text = rest.partition(":")
            port = port_text if colon else None
        if not host:
            raise ConfigError(f"--peer {text!r}: no host after '@'; give {forms}")
    values: dict[str, Any] = {"ae_title": ae, "host": host}
    if port is not None:
        if not port.isdigit():
            raise ConfigError(f"--peer {text!r}: the port {port!r} is not a number; give {forms}")
        values["port"] = int(port)
    try:
        return Peer.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"--peer {text!r}: {problems}") from None


# -- is there a configuration at all? --------------------------------------------------------
ENV_DATA_DIR = "FEDNODE_NODE__DATA_DIR"


def require_config(explicit: Path | None) -> Path | None:
    """The config file of a command that works on an initialised node, or a clear error.

    A node configured by environment variables alone (containers) has no file: it must at
    least name its data folder (``FEDNODE_NODE__DATA_DIR``).
    """
    path = find_config(explicit)
    if path is None and not os.environ.get(ENV_DATA_DIR):
        looked = ", ".join(str(p) for p in DEFAULT_CONFIG_PATHS)
        raise ConfigError(
            f"no configuration: looked for {looked} and ${ENV_CONFIG}; fix: run the command in "
            "the node's folder, pass -c FILE, or create a node with `fednode init`"
        )
    return path
