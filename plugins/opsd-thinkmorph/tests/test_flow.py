"""Visual-thought sampling: the shifted schedule, the Euler loop and its dtypes, guidance combination and branch requests."""

import math

import pytest
import torch
from opsd_thinkmorph.flow import GuidanceConfig, bagel_schedule, combine_guidance, sample_visual_thought_latents

UNGUIDED = GuidanceConfig(text_scale=1.0, image_scale=1.0)


def _t(*rows):
    """A (1, M, C) float tensor from M token rows."""
    return torch.tensor([list(rows)], dtype=torch.float32)


def _noise(shape=(2, 6, 64), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- schedule and scheduler


def test_schedule_values():
    schedule = bagel_schedule(50, 3.0)
    assert schedule.shape == (50,) and schedule.dtype == torch.float32
    assert schedule[0] == 1.0 and schedule[-1] == 0.0
    assert bool((schedule[:-1] > schedule[1:]).all())
    plain = torch.linspace(1, 0, 50)
    torch.testing.assert_close(schedule, 3 * plain / (1 + 2 * plain))
    assert bagel_schedule(5, 3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    torch.testing.assert_close(bagel_schedule(7, 1.0), torch.linspace(1, 0, 7))


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 2"):
        bagel_schedule(1)
    with pytest.raises(ValueError, match="positive"):
        bagel_schedule(10, 0.0)


def test_loop_equals_the_hand_loop():
    """x <- x - v(x, t_k) (t_k - t_{k+1}) exactly, for a state-dependent velocity."""

    def velocity(x, t):
        return torch.sin(3 * x) * (1 + t) - 0.5 * x

    noise = _noise()
    sampled = sample_visual_thought_latents(lambda x, t, branches: {"cond": velocity(x, t)}, noise, UNGUIDED)
    schedule = bagel_schedule(UNGUIDED.num_timesteps, UNGUIDED.shift)
    x = noise
    for k in range(len(schedule) - 1):
        x = x - velocity(x, schedule[k].item()) * (schedule[k] - schedule[k + 1])
    assert torch.equal(sampled, x)


@pytest.mark.parametrize(("num_timesteps", "shift"), [(50, 3.0), (4, 1.0), (13, 0.5)])
def test_exact_flow_lands_on_the_data(num_timesteps, shift):
    """With v = noise - x0 (the flow-matching target) Euler integration is exact and must end on x0.

    The field is evaluated from the state, v = (x - x0) / t, so a wrong sign or a wrong time
    passed to the velocity function would not land on x0.
    """
    x0 = _noise(seed=1)
    noise = _noise(seed=2)
    config = GuidanceConfig(text_scale=1.0, num_timesteps=num_timesteps, shift=shift)
    times = []

    def velocity_fn(x, t, branches):
        times.append(t)
        return {"cond": (x - x0) / t}

    sampled = sample_visual_thought_latents(velocity_fn, noise, config)
    torch.testing.assert_close(sampled, x0, atol=1e-5, rtol=0)
    assert times == bagel_schedule(num_timesteps, shift)[:-1].tolist()


def test_state_stays_float32_and_the_product_keeps_the_velocity_dtype():
    """BAGEL's update x - v * dt with dt a 0-dim float32 step: a bf16 v gives a bf16 product, a float32 state."""
    noise = _noise()
    seen = []

    def velocity_fn(x, t, branches):
        seen.append(x.dtype)
        return {"cond": x.to(torch.bfloat16)}

    sampled = sample_visual_thought_latents(velocity_fn, noise, GuidanceConfig(text_scale=1.0, num_timesteps=5))
    assert sampled.dtype == torch.float32 and set(seen) == {torch.float32}
    schedule = bagel_schedule(5, 3.0)
    x = noise
    for k in range(4):
        product = x.to(torch.bfloat16) * (schedule[k] - schedule[k + 1])
        assert product.dtype == torch.bfloat16
        x = x - product
    assert torch.equal(sampled, x)


def test_noise_must_be_float32():
    with pytest.raises(ValueError, match="noise must be float32"):
        sample_visual_thought_latents(lambda x, t, branches: {"cond": x}, _noise().double(), UNGUIDED)


def test_progress_is_reported_after_each_update():
    calls = []
    sample_visual_thought_latents(
        lambda x, t, branches: {"cond": x},
        _noise(),
        GuidanceConfig(text_scale=1.0, num_timesteps=4),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]


# ---- guidance combination


def test_channel_renorm_by_hand():
    v = _t([3.0, 4.0], [0.0, 1.0])
    v_text = _t([0.0, 0.0], [0.0, 1.0])
    config = GuidanceConfig(text_scale=2.0, image_scale=1.0, renorm="channel")
    # guided = v_text + 2 (v - v_text) = [[6, 8], [0, 1]]; per-token ratios 5/10 and 1/1
    torch.testing.assert_close(combine_guidance(v, v_text, None, config), _t([3.0, 4.0], [0.0, 1.0]))


def test_global_renorm_by_hand():
    v = _t([3.0, 4.0], [0.0, 1.0])
    v_text = _t([0.0, 0.0], [0.0, 1.0])
    config = GuidanceConfig(text_scale=2.0, image_scale=1.0, renorm="global")
    # one ratio for the whole sample: ||v|| / ||guided|| = sqrt(26) / sqrt(101)
    expected = _t([6.0, 8.0], [0.0, 1.0]) * math.sqrt(26 / 101)
    torch.testing.assert_close(combine_guidance(v, v_text, None, config), expected)


def test_renorm_clamps_at_renorm_min_and_at_one():
    v = _t([3.0, 4.0])
    config = GuidanceConfig(text_scale=2.0, image_scale=1.0, renorm="channel", renorm_min=0.8)
    # guided [6, 8] would be halved, but the factor may not fall below 0.8
    torch.testing.assert_close(combine_guidance(v, _t([0.0, 0.0]), None, config), _t([4.8, 6.4]))
    # guided = [4, 6] + 2 ([3, 4] - [4, 6]) = [2, 2] is shorter than v: the factor stops at 1, no growth
    for renorm in ("global", "channel", "text_channel"):
        config = GuidanceConfig(text_scale=2.0, image_scale=1.0, renorm=renorm)
        torch.testing.assert_close(combine_guidance(v, _t([4.0, 6.0]), None, config), _t([2.0, 2.0]))


def test_image_guidance_by_hand_in_each_mode():
    v, v_text, v_image = _t([3.0, 4.0]), _t([0.0, 0.0]), _t([1.0, 0.0])
    # text guidance: [6, 8] (norm 10, twice ||v|| = 5)
    text_channel = GuidanceConfig(text_scale=2.0, image_scale=2.0, renorm="text_channel")
    # rescale first to [3, 4], then image guidance [1, 0] + 2 ([3, 4] - [1, 0]) = [5, 8], not rescaled again
    torch.testing.assert_close(combine_guidance(v, v_text, v_image, text_channel), _t([5.0, 8.0]))
    # image guidance first: [1, 0] + 2 ([6, 8] - [1, 0]) = [11, 16], then rescale by 5 / sqrt(377)
    expected = _t([11.0, 16.0]) * (5 / math.sqrt(377))
    for renorm in ("global", "channel"):
        config = GuidanceConfig(text_scale=2.0, image_scale=2.0, renorm=renorm)
        torch.testing.assert_close(combine_guidance(v, v_text, v_image, config), expected)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_norms_are_per_sample(renorm):
    v, v_text, v_image = _noise((3, 5, 8), 1), _noise((3, 5, 8), 2), _noise((3, 5, 8), 3)
    config = GuidanceConfig(text_scale=3.0, image_scale=1.5, renorm=renorm)
    batched = combine_guidance(v, v_text, v_image, config)
    for b in range(3):
        alone = combine_guidance(v[b : b + 1], v_text[b : b + 1], v_image[b : b + 1], config)
        torch.testing.assert_close(batched[b : b + 1], alone)


def test_scales_of_one_or_less():
    v, v_text, v_image = _noise((1, 4, 8), 1), _noise((1, 4, 8), 2), _noise((1, 4, 8), 3)
    # no text guidance means no guidance at all, even with a large image scale
    for text_scale in (0.0, 1.0):
        config = GuidanceConfig(text_scale=text_scale, image_scale=5.0)
        assert combine_guidance(v, v_text, v_image, config) is v
    # image scale <= 1: the image-unconditional velocity is ignored and may be absent
    config = GuidanceConfig(text_scale=3.0, image_scale=1.0, renorm="channel")
    torch.testing.assert_close(combine_guidance(v, v_text, None, config), combine_guidance(v, v_text, v_image, config))
    with pytest.raises(ValueError, match="image-unconditional"):
        combine_guidance(v, v_text, None, GuidanceConfig(text_scale=3.0, image_scale=1.5))


# ---- branch requests


def _recorded_calls(config):
    calls = []

    def velocity_fn(x, t, branches):
        calls.append((t, branches))
        return {branch: torch.full_like(x, index + 1.0) for index, branch in enumerate(branches)}

    sample_visual_thought_latents(velocity_fn, _noise((1, 2, 4)), config)
    return calls


def test_branches_follow_the_interval_and_the_scales():
    config = GuidanceConfig(text_scale=3.0, image_scale=1.5, interval=(0.4, 1.0), num_timesteps=20)
    calls = _recorded_calls(config)
    assert len(calls) == 19
    for t, branches in calls:
        guided = bool(torch.tensor(t) > 0.4) and t <= 1.0
        assert branches == (("cond", "text_uncond", "image_uncond") if guided else ("cond",)), t
    assert calls[0] == (1.0, ("cond", "text_uncond", "image_uncond"))  # hi is inclusive
    assert {branches for _, branches in calls} == {("cond",), ("cond", "text_uncond", "image_uncond")}

    no_image = _recorded_calls(GuidanceConfig(text_scale=3.0, image_scale=1.0, num_timesteps=6))
    assert [branches for _, branches in no_image] == [("cond", "text_uncond")] * 5
    no_text = _recorded_calls(GuidanceConfig(text_scale=1.0, image_scale=2.0, num_timesteps=6))
    assert [branches for _, branches in no_text] == [("cond",)] * 5


def test_interval_bounds_are_lo_exclusive_hi_inclusive():
    config = GuidanceConfig(interval=(0.5, 0.9))
    assert config.branches_at(0.5) == ("cond",)
    assert config.branches_at(0.9) == ("cond", "text_uncond", "image_uncond")
    assert config.branches_at(0.95) == ("cond",)


def _official_guided_steps(num_timesteps, shift, interval):
    """BAGEL's rule, written as its loop writes it: float32 times from a float32 linspace, each
    compared as a 0-dim float32 tensor with the python bounds (which torch rounds to float32)."""
    timesteps = torch.linspace(1, 0, num_timesteps)
    timesteps = shift * timesteps / (1 + (shift - 1) * timesteps)
    return [bool(t > interval[0] and t <= interval[1]) for t in timesteps[:-1]]


def _guided_steps_of_the_loop(num_timesteps, shift, interval):
    config = GuidanceConfig(
        text_scale=2.0, image_scale=1.0, interval=interval, num_timesteps=num_timesteps, shift=shift
    )
    guided = []

    def velocity_fn(x, t, branches):
        guided.append(branches == ("cond", "text_uncond"))
        return {branch: x for branch in branches}

    sample_visual_thought_latents(velocity_fn, torch.ones(1, 1, 1), config)
    return guided


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.4, 1.0)])
@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0])
def test_guided_steps_are_the_official_ones(shift, interval):
    """Every step count from 5 to 100; at a time equal to float32(0.4) BAGEL does not guide."""
    on_the_bound = []
    for num_timesteps in range(5, 101):
        expected = _official_guided_steps(num_timesteps, shift, interval)
        assert _guided_steps_of_the_loop(num_timesteps, shift, interval) == expected, num_timesteps
        times = bagel_schedule(num_timesteps, shift)[:-1].tolist()
        if [interval[0] < t <= interval[1] for t in times] != expected:  # the float64 comparison
            on_the_bound.append(num_timesteps)
    # The counts where a float64 comparison guides one step more than BAGEL.
    assert on_the_bound == {
        (1.0, (0.4, 1.0)): [6, 11, 21, 36, 41, 46, 66, 71, 76, 81, 86, 91, 96],
        (2.0, (0.4, 1.0)): list(range(5, 101, 4)),
        (3.0, (0.4, 1.0)): [12, 23, 34, 45, 67, 78, 89, 100],
    }.get((shift, interval), [])


def test_a_time_on_the_lower_bound_in_float32_is_not_guided():
    config = GuidanceConfig(text_scale=3.0, image_scale=1.5, interval=(0.4, 1.0), num_timesteps=25, shift=2.0)
    t = bagel_schedule(25, 2.0)[18]
    assert t.item() == 0.4000000059604645 and t.item() > 0.4
    assert not config.guided_at(t) and config.branches_at(t) == ("cond",)
    assert config.guided_at(bagel_schedule(25, 2.0)[17])


def test_guided_steps_use_the_combined_velocity():
    config = GuidanceConfig(text_scale=2.0, image_scale=1.5, interval=(0.5, 1.0), num_timesteps=8, renorm="channel")
    fields = {"cond": 1.0, "text_uncond": -0.5, "image_uncond": 0.25}

    def velocities(x, branches):
        return {branch: torch.sin(x * fields[branch]) + fields[branch] for branch in branches}

    noise = _noise((2, 3, 8))
    sampled = sample_visual_thought_latents(lambda x, t, branches: velocities(x, branches), noise, config)
    schedule = bagel_schedule(8, 3.0)
    x = noise
    for k in range(7):
        t = schedule[k].item()
        out = velocities(x, ("cond", "text_uncond", "image_uncond"))
        v = combine_guidance(out["cond"], out["text_uncond"], out["image_uncond"], config) if t > 0.5 else out["cond"]
        x = x - v * (schedule[k] - schedule[k + 1])
    assert torch.equal(sampled, x)


# ---- configuration


def test_defaults_are_the_eval_harness_ones():
    config = GuidanceConfig()
    assert (config.text_scale, config.image_scale, config.interval) == (4.0, 2.0, (0.0, 1.0))
    assert (config.renorm, config.renorm_min, config.num_timesteps, config.shift) == ("text_channel", 0.0, 50, 3.0)
    with pytest.raises(AttributeError):
        config.text_scale = 3.0  # frozen


def test_interval_is_normalised_to_a_float_tuple():
    assert GuidanceConfig(interval=[0, 1]).interval == (0.0, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text_scale": -1.0}, "text_scale"),
        ({"image_scale": -0.5}, "image_scale"),
        ({"interval": (0.6, 0.4)}, "interval"),
        ({"interval": (-0.1, 1.0)}, "interval"),
        ({"interval": (0.0, 0.5, 1.0)}, "interval"),
        ({"renorm": "per_token"}, "renorm must be one of global, channel, text_channel"),
        ({"renorm_min": -0.1}, "renorm_min"),
        ({"renorm_min": 1.5}, "renorm_min"),
        ({"num_timesteps": 1}, "num_timesteps"),
        ({"shift": 0.0}, "shift"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuidanceConfig(**kwargs)
