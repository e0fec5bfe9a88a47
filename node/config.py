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
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
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
    peers: list[Peer] = Field(
        default_factory=list, description="[[dicom.peers]] entries allowed to associate"
    )

    @field_validator("max_pdu")
    @classmethod
    def _pdu(cls, value: int) -> int:
        if value and value < 4096:
            raise ValueError("max_pdu is 0 (unlimited) or at least 4096")
        return value


class DatabaseSection(_Section):
    url: str = Field(
        "",
        description="SQLAlchemy URL: empty = SQLite in data_dir, or postgresql+psycopg://user@host/db",
    )
    busy_timeout_ms: int = Field(10000, ge=0, description="SQLite lock wait, milliseconds")
    pool_size: int = Field(5, ge=1, description="connections per process (PostgreSQL)")


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


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="one of DEBUG, INFO, WARNING, ERROR"
    )
    format: Literal["text", "json"] = Field("text", description="text or json")


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
    """Mask the password of a database URL."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


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
