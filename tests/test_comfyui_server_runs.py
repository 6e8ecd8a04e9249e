"""DUGE Unlearn in a real ComfyUI server under repeated, cancelled and failing prompts: `-m comfyui`.

One server with ComfyUI's default cache, so the demo MODEL is loaded once and every prompt below
trains on that same loaded object, as in a user's session:
- two prompts with different seeds queued back to back leave the loaded MODEL bit-identical (its
  saved weights before and after) and each gives the LoRA a lone run with its seed gives;
- a prompt cancelled mid-training (POST /interrupt, sent once the node reports a training step
  over the websocket) and then queued again gives the uncancelled result;
- a prompt whose concept set is broken is refused with the node's error (what the frontend shows
  on the node), and the next prompt runs.
"Lone run": the same prompt as the only one on a second, fresh server (--cache-none). Training is
a few steps on the built-in model, so the file stays cheap on a shared CPU.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helper modules beside the tests

from comfyui_server import ComfyServer, ComfyServerError, comfyui_path_or_skip, status_messages  # noqa: E402

COMFYUI_PATH = comfyui_path_or_skip()

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

TINY_SET = "name: test\nrequests:\n  - target: circle\n    preserve: [square]\n"
BROKEN_SET = "name: broken\nrequests:\n  - target: ''\n    preserve: [square]\n"
TRAIN_STEPS = 3
CANCEL_STEPS = 12  # long enough that the interrupt lands while training
SCALE = 100  # duge.backends.comfy_run.ComfyPhases.SCALE: ComfyUI's bar counts hundredths of an image or step
UNLEARN = "3"  # node id of DUGE Unlearn in the prompts below
RUN_TIMEOUT = 1800


def unlearn_prompt(seed: int, lora_prefix: str, steps: int = TRAIN_STEPS, concept_set: str = TINY_SET) -> dict:
    """demo MODEL -> concept set -> DUGE Unlearn -> Save Unlearning LoRA (API form)."""
    return {
        "1": {"class_type": "DugeLoadDemoModel", "inputs": {}},
        "2": {"class_type": "DugeLoadConceptSet", "inputs": {"file": "(typed text below)", "text": concept_set}},
        UNLEARN: {"class_type": "DugeUnlearn", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concept_set": ["2", 0], "steps": steps, "learning_rate": 5e-2,
            "beta": 50.0, "lambda_prior": 1.0, "lambda_reg": 1.0, "setting": "sequential", "seed": seed,
            "trainable": "kv", "anchor_images": 2, "sampler_steps": 3}},
        "4": {"class_type": "DugeSaveUnlearningLora", "inputs": {
            "lora": [UNLEARN, 1], "filename_prefix": f"loras/{lora_prefix}", "rank": 0, "one_file_per_request": False}},
    }


def save_model_prompt(prefix: str) -> dict:
    """The loaded demo MODEL itself saved as a checkpoint (its weights, patches applied)."""
    return {
        "1": {"class_type": "DugeLoadDemoModel", "inputs": {}},
        "5": {"class_type": "DugeSaveUnlearnedCheckpoint", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "filename_prefix": f"checkpoints/{prefix}"}},
    }


def run(server: ComfyServer, prompt: dict) -> dict:
    entry = server.wait(server.queue(prompt), timeout=RUN_TIMEOUT)
    assert entry["status"]["status_str"] == "success", status_messages(entry) + server.log_tail()
    return entry


def saved(server: ComfyServer, pattern: str) -> dict[str, torch.Tensor]:
    files = sorted(server.output_dir.glob(pattern))
    assert len(files) == 1, f"{pattern}: {files}"
    return load_file(str(files[0]))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert set(a) == set(b), what
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{what}: {len(differing)} tensors differ, e.g. {differing[:3]}"


async def queue_and_interrupt_mid_training(server: ComfyServer, prompt: dict, total_steps: int) -> list[str]:
    """Queues `prompt`, POSTs /interrupt once DUGE Unlearn reports a training step (not the last one),
    and returns the websocket message types of that prompt until it has stopped."""
    import aiohttp  # ComfyUI's own dependency, in its venv

    client_id = str(uuid.uuid4())
    seen: list[str] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as reply:
                prompt_id = (await reply.json())["prompt_id"]
            interrupted = False
            async with asyncio.timeout(RUN_TIMEOUT):
                async for message in ws:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue  # binary preview images
                    event = json.loads(message.data)
                    data = event.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    seen.append(event["type"])
                    training = (event["type"] == "progress" and data.get("node") == UNLEARN
                                and data.get("max") == total_steps * SCALE
                                and SCALE <= data.get("value", 0) < (total_steps - 2) * SCALE)
                    if training and not interrupted:
                        async with session.post(f"{server.url}/interrupt", json={}) as _:
                            interrupted = True
                    if event["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                        return seen
                    if event["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                        return seen
    return seen


@pytest.fixture(scope="module")
def lone_runs(tmp_path_factory):
    """LoRA tensors of each seed's prompt run alone, each on a freshly loaded MODEL."""
    lone = {}
    with ComfyServer(COMFYUI_PATH, tmp_path_factory.mktemp("lone"), extra_args=["--cache-none"]) as server:
        for seed, steps in ((1, TRAIN_STEPS), (2, TRAIN_STEPS), (3, CANCEL_STEPS)):
            run(server, unlearn_prompt(seed, f"lone_{seed}", steps))
            lone[seed] = saved(server, f"loras/lone_{seed}_*.safetensors")
    return lone


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with the default cache: the demo MODEL stays loaded between prompts."""
    with ComfyServer(COMFYUI_PATH, tmp_path_factory.mktemp("session")) as running:
        yield running


def test_back_to_back_prompts_leave_the_loaded_model_bit_identical_and_match_lone_runs(lone_runs, server):
    run(server, save_model_prompt("before"))
    first = server.queue(unlearn_prompt(1, "queued_1"))
    second = server.queue(unlearn_prompt(2, "queued_2"))  # queued before the first has finished
    for prompt_id in (first, second):
        entry = server.wait(prompt_id, timeout=RUN_TIMEOUT)
        assert entry["status"]["status_str"] == "success", status_messages(entry)
    run(server, save_model_prompt("after"))
    assert_same_tensors(saved(server, "checkpoints/before_*.safetensors"),
                        saved(server, "checkpoints/after_*.safetensors"), "the loaded MODEL after two runs")
    assert_same_tensors(saved(server, "loras/queued_1_*.safetensors"), lone_runs[1], "seed 1 after nothing")
    assert_same_tensors(saved(server, "loras/queued_2_*.safetensors"), lone_runs[2], "seed 2 right after seed 1")
    assert any(not torch.equal(lone_runs[1][k], lone_runs[2][k]) for k in lone_runs[1]), "the seed changes the edit"


def test_prompt_cancelled_mid_training_then_queued_again_gives_the_uncancelled_result(lone_runs, server):
    prompt = unlearn_prompt(3, "cancelled_3", CANCEL_STEPS)
    seen = asyncio.run(queue_and_interrupt_mid_training(server, prompt, CANCEL_STEPS))
    assert "execution_interrupted" in seen, seen
    assert not list(server.output_dir.glob("loras/cancelled_3_*.safetensors")), "a cancelled run saved a LoRA"
    run(server, prompt)
    assert_same_tensors(saved(server, "loras/cancelled_3_*.safetensors"), lone_runs[3], "seed 3 after a cancel")


def test_broken_concept_set_is_refused_with_the_nodes_error_and_the_next_prompt_runs(server):
    with pytest.raises(ComfyServerError) as refused:
        server.queue(unlearn_prompt(4, "broken", concept_set=BROKEN_SET))
    message = str(refused.value)
    assert '"2"' in message and "requests[0].target" in message, message  # on the concept-set node, naming the field
    run(server, unlearn_prompt(4, "after_broken"))
    assert saved(server, "loras/after_broken_*.safetensors")
