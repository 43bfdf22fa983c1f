"""The recipes for COCO-WholeBody, CrowdPose and AP-10K: each reads its benchmark's keypoint set and names each
teacher file by its mmpose URL, and its teachers' files load the way the recipe loads them, K read from their
final layer; a file of another set is refused in one line naming it.

The real mmpose files are not here (no network): files of their key layout stand in, odkd's own model of each
architecture with K outputs under mmpose's names, one constant a tensor so that a file is a few kilobytes and
a key loaded into the wrong place shows."""

import re
from pathlib import Path

import pytest
import torch

from odkd.config import load_config
from odkd.data.keypoints import keypoint_set
from odkd.errors import OdkdError
from odkd.models import build_model
from odkd.models.teacher import load_configured_teacher
from odkd.train.teacher import new_teacher
from test_checkpoint import assert_holds_constants, constant_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
# recipe -> its keypoint set and the benchmark's K
RECIPES = {"coco_wholebody_hrnet_w16": ("coco_wholebody", 133), "crowdpose_hrnet_w16": ("crowdpose", 14),
           "ap10k_hrnet_w16": ("ap10k", 17)}
MMPOSE_URL = re.compile(r"^# (https://download\.openmmlab\.com/mmpose/\S+\.pth)$", re.MULTILINE)


def mmpose_files(cfg) -> dict[str, str]:
    """The recipe's mmpose files by role: PT's checkpoint as it is, and the file ST's fine-tune starts from."""
    return {"primary": cfg.teachers.primary.checkpoint, "senior": cfg.teachers.senior.init}


def write_mmpose_file(path: Path, model: str, model_args: dict, num_joints: int,
                      head: str = "keypoint_head.") -> dict[str, tuple]:
    """A top-down HRNet file as mmpose's model zoo serves it: {"meta", "state_dict"}, the backbone under
    `backbone.` and the 1x1 output conv under `keypoint_head.final_layer.` (every file of these recipes
    predates mmpose 1.0; 1.x saves `head.final_layer.`). Returns odkd's layout, key -> shape, of the weights."""
    with torch.device("meta"):
        layout = {key: tuple(value.shape) for key, value in build_model(model, num_joints, **model_args)
                  .state_dict().items()}
    state = {(head if key.startswith("final_layer.") else "backbone.") + key: value
             for key, value in constant_state_dict(layout).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"mmpose_version": "0.8.0", "epoch": 210}, "state_dict": state}, path)
    return layout


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_reads_its_benchmark_set_and_gives_each_teacher_file_its_mmpose_url(name):
    path = PIPELINE / f"{name}.toml"
    cfg = load_config(path)
    set_name, k = RECIPES[name]
    assert cfg.data.keypoints == set_name and keypoint_set(cfg.data.keypoints).num_keypoints == k
    files = mmpose_files(cfg).values()
    assert all(Path(file).parent == Path("checkpoints") for file in files)
    assert sorted({Path(url).name for url in MMPOSE_URL.findall(path.read_text())}) == sorted(
        {Path(file).name for file in files})
    assert cfg.teachers.senior.checkpoint == f"{cfg.runs}/teacher_senior/best.pth", "ST's fine-tune writes it"


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_loads_its_mmpose_teachers_and_refuses_a_file_of_another_set(name, tmp_path, monkeypatch):
    cfg = load_config(PIPELINE / f"{name}.toml")
    set_name, k = RECIPES[name]
    pt, st = cfg.teachers.primary, cfg.teachers.senior
    monkeypatch.chdir(tmp_path)  # a recipe's paths are relative to the working directory
    pt_layout = write_mmpose_file(Path(pt.checkpoint), pt.model, pt.model_args, k)
    st_layout = write_mmpose_file(Path(st.init), st.model, st.model_args, k)  # CrowdPose: PT's own file

    # PT as cache-teachers and release-teacher load it, K from the file's final layer
    teacher = load_configured_teacher(cfg, "primary")
    assert teacher.checkpoint.format == "mmpose" and teacher.net.num_joints == k
    assert_holds_constants(teacher.net, pt_layout)
    # ST's fine-tune starts from its file, the seg head new
    senior = new_teacher(cfg, "senior", st.init)
    assert senior.num_joints == k and senior.has_seg_head
    assert_holds_constants(senior, st_layout)

    wrong = 17 if k != 17 else 14  # COCO's body, or CrowdPose's for AP-10K
    for path, role in ((pt.checkpoint, pt), (st.init, st)):
        write_mmpose_file(Path(path), role.model, role.model_args, wrong, head="head.")
    with pytest.raises(OdkdError) as error:
        load_configured_teacher(cfg, "primary")
    assert str(error.value) == (f"teachers.primary.checkpoint: {tmp_path / pt.checkpoint}: its final layer outputs "
                                f"{wrong} keypoints, but [data] keypoints {set_name!r} has {k}")
    with pytest.raises(OdkdError) as error:
        new_teacher(cfg, "senior", st.init)
    assert str(error.value) == (f"{st.init}: its final layer outputs {wrong} keypoints, the model {k} (a file of "
                                f"another keypoint set than [data] keypoints?)")
