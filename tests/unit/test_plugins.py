"""Task plugins: preprocessing of real and compressed DICOM images, the chest task's selection,
the registry and its error messages, the HE encoding, labels vocabulary, coded concepts."""

from __future__ import annotations

import copy
import sys
import types
from collections.abc import Iterator

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    generate_uid,
)

from node.config import Settings, TasksSection
from node.errors import ExitCode, PluginError
from node.tasks import load_tasks
from plugins.base import (
    HEEncoding,
    PluginLoadError,
    PreprocessingError,
    TaskPlugin,
    architecture_hash,
    resolve_task,
)
from plugins.base import load_tasks as load_refs
from plugins.chest_xray import ChestXrayTask
from plugins.chest_xray.synth import synthesize_image
from plugins.chest_xray.task import PNEUMONIA
from plugins.imaging import _window, image_to_input, resize_area, to_display
from tests.support.dicomgen import FakeStudy, ct_instance, dx_instance


def pydicom_file(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data lacks {name}"
    return dcmread(path)


@pytest.fixture(scope="module")
def task() -> ChestXrayTask:
    return ChestXrayTask()


# -- preprocessing --------------------------------------------------------------------------


def test_real_chest_radiograph_preprocesses_to_the_input_shape_and_range(
    task: ChestXrayTask,
) -> None:
    ds = pydicom_file("RG1_UNCR.dcm")  # CR, chest PA, MONOCHROME1, 1955 x 1841, 15 bits
    assert task.accepts(ds)
    x = task.preprocess([ds])
    assert x.shape == (1, 64, 64) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.max() - x.min() > 1.5  # the window spreads the image over the range
    # MONOCHROME1 is inverted: the mediastinum (centre column) is brighter than the lungs
    mediastinum = x[0, 20:40, 30:34].mean()
    lungs = np.concatenate([x[0, 20:40, 14:20], x[0, 20:40, 44:50]]).mean()
    assert mediastinum > lungs + 0.2


def test_window_follows_ps3_3_formula_for_rg1(task: ChestXrayTask) -> None:
    ds = pydicom_file("RG1_UNCR.dcm")
    stored = ds.pixel_array.astype(np.float64)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = 1.0 - np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(to_display(ds), expected, atol=1e-12)


@pytest.mark.parametrize(
    ("compressed", "tolerance"),
    [("RG1_J2KR.dcm", 0.0), ("RG1_J2KI.dcm", 0.01)],  # JPEG 2000 lossless, lossy
)
def test_compressed_chest_radiograph_matches_the_uncompressed_one(
    task: ChestXrayTask, compressed: str, tolerance: float
) -> None:
    reference = task.preprocess([pydicom_file("RG1_UNCR.dcm")])
    ds = pydicom_file(compressed)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_allclose(task.preprocess([ds]), reference, atol=tolerance)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "MR_small_RLE.dcm",  # RLE lossless
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    ],
)
def test_lossless_codecs_decode_to_the_same_input(name: str) -> None:
    reference = image_to_input(pydicom_file("MR_small.dcm"), (32, 32))
    ds = pydicom_file(name)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(image_to_input(ds, (32, 32)), reference)


@pytest.mark.parametrize(
    "name",
    [
        "JPGExtended.dcm",  # JPEG extended, 12 bit
        "JPEG-LL.dcm",  # JPEG lossless process 14, signed 16 bit
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR colour
        "vlut_04.dcm",  # VOI LUT Sequence
        "mlut_18.dcm",  # Modality LUT Sequence
    ],
)
def test_other_encodings_reach_the_normalised_range(name: str) -> None:
    x = image_to_input(pydicom_file(name), (48, 48))
    assert x.shape == (48, 48) and x.dtype == np.float32
    assert -1.0 <= x.min() < x.max() <= 1.0


def test_monochrome1_and_monochrome2_of_the_same_image_agree() -> None:
    study = FakeStudy()
    mono2 = dx_instance(study, generate_uid(), 0, size=64)
    mono2.file_meta = FileMetaDataset()
    mono2.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    mono2.WindowCenter, mono2.WindowWidth = 8192, 16384
    mono1 = copy.deepcopy(mono2)
    stored = mono2.pixel_array
    mono1.PixelData = (16383 - stored).astype(np.uint16).tobytes()
    mono1.PhotometricInterpretation = "MONOCHROME1"
    mono1.WindowCenter = 16383 - 8192
    np.testing.assert_allclose(to_display(mono1), to_display(mono2), atol=1e-3)


def test_undecodable_pixel_data_is_a_preprocessing_error(task: ChestXrayTask) -> None:
    ds = pydicom_file("RG1_J2KR.dcm")
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\x00" * 16
    with pytest.raises(PreprocessingError, match="cannot decode the pixel data"):
        task.preprocess([ds])
    del ds.PixelData
    with pytest.raises(PreprocessingError, match="no pixel data"):
        task.preprocess([ds])


def test_window_functions() -> None:
    values = np.array([0.0, 99.5, 100.0, 150.0, 200.0])
    # PS3.3 C.11.2.1.2.1 LINEAR: center 100, width 101 covers 49.5 .. 149.5
    np.testing.assert_allclose(_window(values, 100, 101, "LINEAR"), [0, 0.5, 0.505, 1, 1])
    np.testing.assert_allclose(_window(values, 100, 100, "LINEAR_EXACT"), [0, 0.495, 0.5, 1, 1])
    sigmoid = _window(values, 100, 100, "SIGMOID")
    assert sigmoid[2] == pytest.approx(0.5) and np.all(np.diff(sigmoid) > 0)


def test_area_resize_preserves_the_mean() -> None:
    image = np.random.default_rng(1).random((97, 61))
    small = resize_area(image, 16, 10)
    assert small.shape == (16, 10)
    assert small.mean() == pytest.approx(image.mean(), rel=1e-12)
    np.testing.assert_allclose(resize_area(np.ones((50, 50)), 7, 7), np.ones((7, 7)))


# -- selection ----------------------------------------------------------------------------


def test_chest_task_accepts_frontal_chest_radiographs_only(task: ChestXrayTask) -> None:
    study = FakeStudy()
    pa = dx_instance(study, generate_uid(), 0, size=32)
    assert task.accepts(pa)
    ap = copy.deepcopy(pa)
    ap.ViewPosition = "AP"
    assert task.accepts(ap)
    lateral = copy.deepcopy(pa)
    lateral.ViewPosition = "LL"
    assert not task.accepts(lateral)
    coded = copy.deepcopy(pa)
    coded.ViewPosition = ""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = (
        "399348003", "SCT", "antero-posterior"
    )  # fmt: skip
    coded.ViewCodeSequence = [item]
    assert task.accepts(coded)
    processing = copy.deepcopy(pa)
    processing.SOPClassUID = DigitalXRayImageStorageForProcessing
    processing.PresentationIntentType = "FOR PROCESSING"
    assert not task.accepts(processing)
    knee = copy.deepcopy(pa)
    knee.BodyPartExamined = "KNEE"
    assert not task.accepts(knee)
    assert not task.accepts(ct_instance(study, generate_uid(), 1, 0, size=16))
    assert not task.accepts(pydicom_file("RG3_UNCR.dcm"))  # CR of an extremity


def test_chest_task_prefers_pa_and_refuses_a_study_without_frontal_view(
    task: ChestXrayTask,
) -> None:
    study = FakeStudy()
    ap = dx_instance(study, generate_uid(), 0, size=32)
    ap.ViewPosition = "AP"
    pa = dx_instance(study, generate_uid(), 1, size=32)
    lateral = dx_instance(study, generate_uid(), 2, size=32)
    lateral.ViewPosition = "LL"
    assert task.select([lateral, ap, pa]) is pa
    assert task.select([lateral, ap]) is ap
    with pytest.raises(PreprocessingError, match="no frontal chest radiograph"):
        task.preprocess([lateral])


# -- the task's description -----------------------------------------------------------------


def test_coded_concepts_match_the_dicom_code_dictionary(task: ChestXrayTask) -> None:
    assert (PNEUMONIA.value, PNEUMONIA.scheme_designator) == ("233604007", "SCT")
    no, yes = task.classes
    assert (no.concept.value, yes.concept.value) == (
        codes.SCT.Absent.value,
        codes.SCT.Present.value,
    )
    from plugins.chest_xray.task import VIEW_CODES

    assert VIEW_CODES[codes.SCT.PosteroAnterior.value] == "PA"
    assert VIEW_CODES[codes.SCT.AnteroPosterior.value] == "AP"


def test_labels_vocabulary_and_decision(task: ChestXrayTask) -> None:
    assert task.parse_label("Pneumonia") == "pneumonia"
    assert task.parse_label(" 0 ") == "no_pneumonia"
    assert task.parse_label("yes") == "pneumonia"
    with pytest.raises(ValueError, match="not a class of task chest_xray"):
        task.parse_label("maybe")
    assert task.decide(0.5).name == "pneumonia"
    assert task.decide(0.49).name == "no_pneumonia"


def test_model_is_ckks_shaped(task: ChestXrayTask) -> None:
    import torch

    assert task.he_encoding.problems(task.input_shape) == []
    assert task.he_encoding.max_abs_output == 16.0
    model = task.build_model()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 and convs[0].in_channels == 1
    assert convs[0].kernel_size == (8, 8) and convs[0].stride == (8, 8)
    allowed = (torch.nn.Conv2d, torch.nn.Linear, type(model), type(model.act1))
    assert all(isinstance(m, allowed) for m in model.modules())
    assert model(torch.zeros(3, *task.input_shape)).shape == (3, 1)
    digest = architecture_hash(task, model)
    assert digest == architecture_hash(task, task.build_model())  # weights do not matter
    from plugins.chest_xray.model import ChestXrayNet

    assert digest != architecture_hash(task, ChestXrayNet(hidden=16))


def test_he_encoding_reports_inconsistent_parameters() -> None:
    bad = HEEncoding(coeff_mod_bit_sizes=(31, 26, 31), output_bound=20.0, stride=4)
    problems = bad.problems((1, 64, 64))
    assert any("multiplicative depth" in p for p in problems)
    assert any("output_bound" in p for p in problems)
    assert any("slots" in p for p in problems)  # 225 overlapping windows of 64 values
    assert HEEncoding().problems((3, 64, 64)) == ["im2col packing needs a single-channel input"]


def test_synthetic_images_carry_the_finding_in_a_lung() -> None:
    negative, _ = synthesize_image(np.random.default_rng(7), 128, view="PA", finding=False)
    positive, meta = synthesize_image(np.random.default_rng(7), 128, view="PA", finding=True)
    assert negative.shape == positive.shape == (128, 128)
    assert 0.0 <= positive.min() and positive.max() <= 1.0
    assert meta["lesions"] >= 1
    assert np.abs(positive - negative).max() > 0.1


# -- registry -------------------------------------------------------------------------------


class _Minimal(ChestXrayTask):
    name = "minimal_task"


def _factory() -> TaskPlugin:
    return _Minimal()


def _broken_factory() -> TaskPlugin:
    raise RuntimeError("cannot start")


class _BadName(ChestXrayTask):
    name = "Bad Name"


@pytest.fixture
def plugin_module() -> Iterator[str]:
    module = types.ModuleType("fednode_test_plugins")
    module.Minimal = _Minimal  # type: ignore[attr-defined]
    module.instance = _Minimal()  # type: ignore[attr-defined]
    module.factory = _factory  # type: ignore[attr-defined]
    module.broken = _broken_factory  # type: ignore[attr-defined]
    module.BadName = _BadName  # type: ignore[attr-defined]
    module.not_a_task = 42  # type: ignore[attr-defined]
    module.wrong_return = lambda: "task"  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield module.__name__
    del sys.modules[module.__name__]


def test_builtin_and_references_resolve(plugin_module: str) -> None:
    assert isinstance(resolve_task("chest_xray"), ChestXrayTask)
    assert resolve_task("plugins.chest_xray:ChestXrayTask").name == "chest_xray"
    for attr in ("Minimal", "instance", "factory"):
        assert resolve_task(f"{plugin_module}:{attr}").name == "minimal_task"
    tasks = load_refs(["chest_xray", f"{plugin_module}:factory"])
    assert list(tasks) == ["chest_xray", "minimal_task"]


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_such_task", "neither a built-in task"),
        ("no_such_pkg.tasks:Task", "module 'no_such_pkg.tasks' not found"),
        ("{mod}:Missing", "has no attribute 'Missing'"),
        ("{mod}:not_a_task", "is a int, not a TaskPlugin"),
        ("{mod}:wrong_return", "returned a str, not a TaskPlugin"),
        ("{mod}:broken", "creating it failed: RuntimeError: cannot start"),
        ("{mod}:BadName", "name 'Bad Name' must match"),
    ],
)
def test_broken_references_say_what_is_wrong(plugin_module: str, ref: str, message: str) -> None:
    with pytest.raises(PluginLoadError, match=message):
        resolve_task(ref.format(mod=plugin_module))


def test_two_tasks_of_one_name_are_refused(plugin_module: str) -> None:
    with pytest.raises(PluginLoadError, match="like another enabled task"):
        load_refs([f"{plugin_module}:Minimal", f"{plugin_module}:instance"])


def test_start_up_check_turns_a_broken_reference_into_a_plugin_error(tmp_path: object) -> None:
    settings = Settings(tasks=TasksSection(enabled=["chest_xray", "no_such_pkg.tasks:Task"]))
    with pytest.raises(PluginError) as info:
        load_tasks(settings)
    assert info.value.exit_code is ExitCode.PLUGIN
    assert "no_such_pkg.tasks:Task" in str(info.value)
    assert "[tasks] enabled" in str(info.value)
    assert list(load_tasks(Settings())) == ["chest_xray"]
