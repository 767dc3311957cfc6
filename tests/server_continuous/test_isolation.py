"""One request's bad input fails that request alone in the continuous engine, wherever it fails:
preparing it (prompt encoding, image and mask processing), the shared UNet call, or the shared VAE
decode. The request-level engine's counterpart is in tests/server/test_hardening.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from inference_server.continuous.core import ContinuousRequest
from inference_server.engine import GenerationFailed
from tests.server_continuous.conftest import SIZE
from tests.server_continuous.parity import reference, sample_picture


def good(i: int, task: str = "txt2img") -> ContinuousRequest:
    extra: dict[str, Any] = {}
    if task != "txt2img":
        extra = {"strength": 0.75, "image": sample_picture(SIZE)}
    if task == "inpaint":
        extra["mask"] = sample_picture(SIZE, mask=True)
    return ContinuousRequest(
        task=task,
        prompt=f"picture {i}",
        seeds=(100 + i,),
        width=SIZE,
        height=SIZE,
        steps=3,
        guidance=5.0,
        **extra,
    )


def assert_exact(pipes: dict[str, Any], reqs: list[ContinuousRequest], results: list[Any]) -> None:
    from inference_server.continuous.engine import scheduler_factory

    factory = scheduler_factory(pipes["inpaint"])
    for r, res in zip(reqs, results, strict=True):
        assert float(np.abs(reference(pipes, factory, r, r.seeds[0]) - res.arrays[0]).max()) < 1e-4


@pytest.mark.parametrize(
    ("task", "change"),
    [
        ("txt2img", {"prompt": "a lone surrogate \ud800"}),
        ("txt2img", {"negative_prompt": "\udc80"}),
        ("img2img", {"image": Image.new("LA", (SIZE, SIZE))}),  # 2 channels: the VAE encoder wants 3
        ("inpaint", {"mask": "not an image"}),
    ],
)
def test_a_request_whose_preparation_fails_fails_alone(
    pipes: dict[str, Any], make_engine: Any, task: str, change: dict[str, Any]
) -> None:
    engine = make_engine(max_batch_size=8)
    goods = [good(i, task) for i in range(3)]
    culprit = engine.submit(replace(good(9, task), **change))
    tickets = [engine.submit(r) for r in goods]
    with pytest.raises(GenerationFailed, match="model failed"):
        culprit.future.result(60)
    results = [t.future.result(60) for t in tickets]
    assert max(r.batch_size for r in results) == 3  # the others still shared their iterations
    assert_exact(pipes, goods, results)


def test_a_unet_call_failing_on_one_requests_state_fails_only_that_request(
    pipes: dict[str, Any], make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UNet call over several requests that fails for one of them (simulated: any call holding the
    poisoned prompt's rows fails) is retried in halves; the others' images stay exact."""
    pipe = pipes["inpaint"]
    poison = pipe.encode_prompt("poisoned", pipe._execution_device, 1, False)[0][0]
    unet = pipe.unet
    real_forward = unet.forward
    calls: list[int] = []

    def forward(
        sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any
    ) -> Any:
        calls.append(sample.shape[0])
        if any(torch.equal(row, poison) for row in encoder_hidden_states):
            raise ValueError("this request's state breaks the model (simulated)")
        return real_forward(sample, timestep, encoder_hidden_states, **kwargs)

    monkeypatch.setattr(unet, "forward", forward)
    engine = make_engine(max_batch_size=8)
    goods = [good(i) for i in range(4)]
    culprit = engine.submit(replace(good(9), prompt="poisoned"))
    tickets = [engine.submit(r) for r in goods]
    with pytest.raises(GenerationFailed, match="model failed"):
        culprit.future.result(60)
    results = [t.future.result(60) for t in tickets]
    monkeypatch.undo()
    assert max(calls) == 2 * 5  # all five (with guidance rows) were first tried together
    assert_exact(pipes, goods, results)
    assert engine._limit == 8  # not mistaken for out-of-memory


def test_a_failed_shared_decode_retries_each_image_alone(
    pipes: dict[str, Any], make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = pipes["inpaint"].vae
    real_decode = vae.decode
    sizes: list[int] = []

    def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sizes.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise RuntimeError("decoding a batch broke (simulated)")
        return real_decode(latents, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    engine = make_engine(max_batch_size=4)
    goods = [good(i) for i in range(3)]
    tickets = [engine.submit(r) for r in goods]
    results = [t.future.result(60) for t in tickets]
    monkeypatch.undo()
    assert max(sizes) == 3 and sizes.count(1) >= 3
    assert_exact(pipes, goods, results)
