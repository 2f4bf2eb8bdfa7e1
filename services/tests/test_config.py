"""Options: typed configurations, unknown FACEPIPE_* variables, secrets, and the docs' option
tables and the Ansible roles' env files checked against the code (the code owns the options)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import program_env

from facepipe import config, contactsheet, delivery, detector, publish, writer
from facepipe.config import (
    MQTT_OPTIONS,
    ConfigError,
    MqttConfig,
    Option,
    config_of,
    config_options,
    non_empty,
    parse_config,
    parse_config_and_arguments,
)
from facepipe.contactsheet import ContactSheetConfig
from facepipe.delivery import PublisherConfig
from facepipe.detector import DetectorConfig
from facepipe.publish import PublishConfig
from facepipe.writer import WriterConfig

SERVICES = Path(__file__).resolve().parent.parent
REPO = SERVICES.parent

# program -> (its module, as run with python -m; its options)
PROGRAMS = {
    "face-detector": ("facepipe.detector", detector.OPTIONS),
    "face-writer": ("facepipe.writer", writer.OPTIONS),
    "facepipe-publish": ("facepipe.publish", publish.OPTIONS),
    "facepipe-contact-sheet": ("facepipe.contactsheet", contactsheet.OPTIONS),
}
CONFIGS = [
    (DetectorConfig, detector.OPTIONS),
    (WriterConfig, writer.OPTIONS),
    (PublishConfig, publish.OPTIONS),
    (ContactSheetConfig, contactsheet.OPTIONS),
    (PublisherConfig, delivery.PUBLISHER_OPTIONS),
    (delivery.OutboxConfig, delivery.OUTBOX_OPTIONS),
    (MqttConfig, MQTT_OPTIONS),
    (config.LoggingConfig, config.LOGGING_OPTIONS),
]


def env_names(options: tuple[Option, ...]) -> set[str]:
    return {opt.env for opt in options}


# --- the dataclasses hold exactly the options -----------------------------------------------


def flat_fields(cls: type) -> list[str]:
    names: list[str] = []
    for f in dataclasses.fields(cls):
        nested = next((c for c, _ in CONFIGS if c.__name__ == f.type), None)
        names += flat_fields(nested) if nested else [f.name]
    return names


@pytest.mark.parametrize(("cls", "options"), CONFIGS, ids=[c.__name__ for c, _ in CONFIGS])
def test_config_fields_are_the_options(cls, options):
    assert config_options(cls) == tuple(options)
    assert sorted(flat_fields(cls)) == sorted(opt.name for opt in options)
    assert cls.__dataclass_params__.frozen


def test_config_of_refuses_a_dataclass_that_does_not_match():
    opts = (Option("a", non_empty, "x"), Option("b", non_empty, None))

    def register(cls: type) -> None:
        config_of(opts)(dataclasses.dataclass(frozen=True)(cls))

    class Missing:
        a: str

    class Extra:
        a: str
        b: str | None
        c: int

    class NoneWhereSet:
        a: str | None
        b: str | None

    class NoNoneWhereUnset:
        a: str
        b: str

    class WrongDefaultType:
        a: int
        b: str | None

    for cls, needle in [
        (Missing, r"missing fields \['b'\]"),
        (Extra, r"fields that are no option \['c'\]"),
        (NoneWhereSet, "must not allow None"),
        (NoNoneWhereUnset, "must allow None"),
        (WrongDefaultType, "default 'x' is not"),
    ]:
        with pytest.raises(TypeError, match=needle):
            register(cls)

    class NotFrozen:
        a: str
        b: str | None

    with pytest.raises(TypeError, match="frozen"):
        config_of(opts)(dataclasses.dataclass(NotFrozen))


def test_a_group_must_hold_the_same_option_objects():
    copies = tuple(dataclasses.replace(opt) for opt in MQTT_OPTIONS)  # equal names, other objects

    with pytest.raises(TypeError, match="not the ones in its option list"):

        @config_of(copies)
        @dataclasses.dataclass(frozen=True)
        class Copied:
            mqtt: MqttConfig


# --- typed values from flags, the environment and defaults --------------------------------------


def test_detector_config_from_flags_environment_and_defaults(tmp_path):
    model = tmp_path / "yunet.onnx"
    model.write_bytes(b"onnx")
    cfg = parse_config(
        DetectorConfig,
        "face-detector",
        "",
        ["--loop", "--mqtt-port=1884", f"--model={model}", "--outbox-max-faces", "10"],
        {
            "FACEPIPE_SOURCE": "/srv/clip.avi",
            "FACEPIPE_MQTT_PORT": "1999",  # the flag wins
            "FACEPIPE_REALTIME": "no",
            "FACEPIPE_JPEG_QUALITY": " ",  # empty: the default
            "FACEPIPE_CROP_MARGIN": "0.5",
            "FACEPIPE_QOS": "0",
            "FACEPIPE_LOG_LEVEL": "DEBUG",
            "FACEPIPE_BRIDGE_STATE_TOPIC": "bridges/cam-1/state",
        },
    )
    assert cfg.source == "/srv/clip.avi"
    assert cfg.loop is True and cfg.realtime is False and cfg.equalize is False
    assert cfg.jpeg_quality == 90 and cfg.crop_margin == 0.5 and cfg.fps == 0.0
    assert cfg.model == model and cfg.cascade is None and cfg.device_id is None
    assert cfg.mqtt.mqtt_port == 1884 and cfg.mqtt.qos == 0 and cfg.mqtt.mqtt_host == "localhost"
    assert cfg.outbox.outbox_max_faces == 10 and cfg.outbox.outbox_dir is None
    assert cfg.outbox.bridge_state_topic == "bridges/cam-1/state"
    assert cfg.logging.log_level == "debug" and cfg.logging.stats_interval == 60.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.source = "other"  # type: ignore[misc]


def test_writer_and_publish_configs():
    cfg = parse_config(
        WriterConfig,
        "face-writer",
        "",
        ["--workers=3"],
        {"FACEPIPE_S3_BUCKET": "faces", "FACEPIPE_MAX_AGE": "86400", "FACEPIPE_WORKERS": "5"},
    )
    assert (cfg.s3_bucket, cfg.s3_prefix, cfg.workers, cfg.max_age) == ("faces", "faces", 3, 86400)
    assert isinstance(cfg.max_age, float) and cfg.mqtt.mqtt_protocol == "5"

    pub, files = parse_config_and_arguments(
        PublishConfig,
        "facepipe-publish",
        "",
        "files",
        ["--wait=5", "a.jpg", "b.jpg"],
        {"FACEPIPE_OUTBOX_DIR": "/var/lib/x", "FACEPIPE_DEVICE_ID": "cam-7"},
    )
    assert files == ["a.jpg", "b.jpg"]
    assert (pub.wait, pub.device_id, pub.detector) == (5.0, "cam-7", "external")
    assert pub.outbox.outbox_dir == "/var/lib/x"


def test_bad_and_missing_values_keep_their_messages():
    with pytest.raises(ConfigError, match=r"^--source / FACEPIPE_SOURCE is required$"):
        parse_config(DetectorConfig, "face-detector", "", [], {})
    with pytest.raises(ConfigError, match=r"^--workers / FACEPIPE_WORKERS: expected a int"):
        parse_config(
            WriterConfig,
            "face-writer",
            "",
            [],
            {"FACEPIPE_S3_BUCKET": "b", "FACEPIPE_WORKERS": "0x"},
        )


# --- unknown FACEPIPE_* variables -----------------------------------------------------------


def test_unknown_variables_are_refused_with_the_closest_name():
    env = {"FACEPIPE_S3_BUCKET": "b", "FACEPIPE_WORKRES": "3", "FACEPIPE_S3_PREFX": "x"}
    with pytest.raises(ConfigError) as err:
        parse_config(WriterConfig, "face-writer", "", ["--workers=3"], env)  # a flag is no excuse
    assert str(err.value) == (
        "unknown setting FACEPIPE_S3_PREFX (not an option of face-writer; did you mean "
        "FACEPIPE_S3_PREFIX?); unknown setting FACEPIPE_WORKRES (not an option of face-writer; "
        "did you mean FACEPIPE_WORKERS?)"
    )
    with pytest.raises(ConfigError, match=r"^unknown setting FACEPIPE_ZZZ \(not an option of x\)$"):
        parse_config(MqttConfig, "x", "", [], {"FACEPIPE_ZZZ": ""})  # empty is still a setting


def test_an_option_of_another_program_is_refused():
    env = {"FACEPIPE_SOURCE": "/dev/video0", "FACEPIPE_S3_BUCKET": "faces"}
    with pytest.raises(ConfigError, match=r"unknown setting FACEPIPE_S3_BUCKET .*face-detector"):
        parse_config(DetectorConfig, "face-detector", "", [], env)


@pytest.mark.parametrize("program", PROGRAMS)
def test_unknown_variable_exits_2_with_one_line_naming_it(program):
    module, _ = PROGRAMS[program]
    env = {k: v for k, v in program_env().items() if not k.startswith("FACEPIPE_")}
    env["FACEPIPE_LOG_LEVLE"] = "debug"
    done = subprocess.run(
        [sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"{program}: error: unknown setting FACEPIPE_LOG_LEVLE (not an option of {program}; "
        "did you mean FACEPIPE_LOG_LEVEL?)"
    ]


# --- secrets ------------------------------------------------------------------------------


def test_read_secret_prefers_credentials_directory(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd\n")
    other = tmp_path / "pw"
    other.write_text("from-file\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert config.read_secret(str(other), "mqtt-password", "x", env) == "from-systemd"
    assert config.read_secret(str(other), "mqtt-password", "x", {}) == "from-file"


# --- the docs and the roles against the code ------------------------------------------------

TABLE_HEAD = re.compile(r"^\|\s*(?:variable|option)\s*\(([^)]*)\)\s*\|")
NAME = re.compile(r"`(FACEPIPE_[A-Z0-9_]+)`")


def readme_tables(text: str) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """From the README's option tables: program -> variables; and (program, variable, default
    cell) per row. A table of FACEPIPE_ variables must name its programs in its header."""
    tables: dict[str, set[str]] = {}
    rows: list[tuple[str, str, str]] = []
    programs: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            programs = None
            continue
        head = TABLE_HEAD.match(line)
        if head:
            programs = [p.strip() for p in head.group(1).split(",")]
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = NAME.findall(cells[0])
        if not names or set(cells[0]) <= set("-"):
            continue
        assert programs is not None, f"an option table without its programs in the header: {line}"
        for program in programs:
            tables.setdefault(program, set()).update(names)
            rows += [(program, name, cells[1]) for name in names if len(names) == 1]
    return tables, rows


def test_readme_lists_exactly_each_programs_options():
    tables, rows = readme_tables((SERVICES / "README.md").read_text())
    assert set(tables) == set(PROGRAMS)
    for program, (_, options) in PROGRAMS.items():
        documented = tables[program]
        assert documented == env_names(options), (
            f"{program}: README lists {sorted(documented - env_names(options))} that are no "
            f"options, misses {sorted(env_names(options) - documented)}"
        )
    for program, name, default in rows:  # a default given as a literal is the code's default
        opt = next(o for o in PROGRAMS[program][1] if o.env == name)
        literal = re.match(r"`([^`]*)`", default)
        if opt.default is not None:
            assert literal, f"{program} {name}: README gives no default, the code {opt.default!r}"
            assert opt.parse(literal.group(1)) == opt.default, f"{program} {name}: {default}"


def test_every_facepipe_variable_in_the_docs_is_an_option():
    docs = [SERVICES / "README.md", REPO / "README.md", *REPO.glob("roles/*/README.md")]
    known = set().union(*(env_names(options) for _, options in PROGRAMS.values()))
    for doc in (d for d in docs if d.is_file()):
        stray = set(re.findall(r"\bFACEPIPE_[A-Z0-9_]+", doc.read_text())) - known
        assert not stray - {"FACEPIPE_NAME"}, f"{doc}: {sorted(stray)} are no options"


@pytest.mark.parametrize(
    ("role", "program"), [("face_detector", "face-detector"), ("face_writer", "face-writer")]
)
def test_the_roles_set_only_options_of_their_program(role, program):
    """What a role renders into its env file (vars, defaults' env mapping examples, templates,
    argument specs) must be options of the program reading it, or the service exits 2."""
    base = REPO / "roles" / role
    if not base.is_dir():
        pytest.skip("the Ansible roles are not next to services/")
    files = [p for d in ("vars", "defaults", "templates", "meta") for p in (base / d).rglob("*")]
    named = {
        n for p in files if p.is_file() for n in re.findall(r"\bFACEPIPE_[A-Z0-9_]+", p.read_text())
    }
    assert named, f"no FACEPIPE_ variables found under {base}"
    assert named <= env_names(PROGRAMS[program][1]), sorted(named - env_names(PROGRAMS[program][1]))


def test_the_roles_device_id_grammar_is_the_contracts() -> None:
    """The roles check device ids at play start with their own copy of the contract's grammar
    (roles/facepipe_site/vars/main.yml); a device id one accepts and the other refuses would pass
    the play and then have every face rejected, or the reverse."""
    import yaml

    from facepipe.contract import DEVICE_ID_RE

    site_vars = yaml.safe_load((REPO / "roles" / "facepipe_site" / "vars" / "main.yml").read_text())
    assert site_vars["_facepipe_site_device_id_pattern"] == DEVICE_ID_RE.pattern


def test_the_role_gives_the_camera_sandbox_to_what_the_detector_opens_as_a_camera() -> None:
    """face_detector's unit gets the video devices and group only for sources its regex calls a
    camera; a source the program opens as a camera but the role does not (e.g. udev's stable
    /dev/v4l/by-id/... link) would be retried forever behind PrivateDevices=yes."""
    import re

    import yaml

    from facepipe.frames import is_camera

    role_vars = yaml.safe_load((REPO / "roles" / "face_detector" / "vars" / "main.yml").read_text())
    expr = role_vars["_face_detector_camera"]
    pattern = re.search(r"match\('([^']+)'\)", expr)
    assert pattern, expr
    sources = [
        "/dev/video0",
        "/dev/video12",
        "0",
        "3",
        "/dev/v4l/by-id/usb-046d_HD_Pro_Webcam_C920-video-index0",
        "/dev/v4l/by-path/platform-xhci-hcd.0-usb-0:1:1.0-video-index0",
        " /dev/video0 ",
        "/var/lib/facepipe/sample.avi",
        "rtsp://cam.local/stream",
        "/srv/frames",
        "video0",
        "",
    ]
    for source in sources:
        assert bool(re.match(pattern.group(1), source.strip())) == is_camera(source), source
