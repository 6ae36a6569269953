"""The memory planner's arithmetic against exact counts: parameter bytes, gradients, two fp32
AdamW states per trainable parameter, the EMA teacher, sharding, offload and LoRA; activation
estimates that grow with the work and shrink with checkpointing; the switches tried in order."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from opsd_core.config import load_config
from opsd_core.memory_census import census_of
from opsd_core.memory_plan import (
    GIB,
    MemoryInputs,
    ParameterCensus,
    Switch,
    activation_bytes_per_token,
    estimate,
    inputs_from_config,
    plan,
    plan_run,
    switches_for,
    with_lora,
)
from opsd_core.types import MemoryShape

QWEN_7B = MemoryShape(
    hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944, vocab_size=152064
)
TINY = MemoryShape(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, intermediate_size=64, vocab_size=40)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 16)
        self.up_proj = torch.nn.Linear(16, 64, bias=False)
        self.norm = torch.nn.LayerNorm(16)


class Toy(torch.nn.Module):
    """Parameters: embedding 40 x 16 = 640; two blocks of q 16 x 16 + 16, up 64 x 16, norm 2 x 16
    (1,328 each); head 16 x 40 = 640: 3,936 in all."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(40, 16)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(16, 40, bias=False)


def toy_census(**kwargs) -> ParameterCensus:
    with torch.device("meta"):
        model = Toy()
    return census_of(model, lambda name: name.split(".")[0], **kwargs)


def test_census_counts_every_parameter_by_group_on_the_meta_device():
    census = toy_census()
    assert dict(census.groups) == {"embed": 640, "blocks": 2 * 1328, "head": 640}
    assert census.total == 3936 == census.trainable and census.frozen == 0
    assert census.bytes_per_element == 4
    frozen_head = toy_census(trainable=lambda name: not name.startswith("head"))
    assert frozen_head.trainable == 3936 - 640 and frozen_head.frozen == 640


def test_census_reads_the_skeletons_dtype():
    with torch.device("meta"):
        model = Toy().to(torch.bfloat16)
    assert census_of(model, str).bytes_per_element == 2


def test_weights_gradients_optimizer_ema_and_start_model_are_exact():
    inputs = MemoryInputs(total_parameters=1000, trainable_parameters=600)
    gpu = estimate(inputs).gpu
    assert gpu["weights"] == 4000
    assert gpu["gradients"] == 600 * 4
    assert gpu["optimizer state"] == 2 * 600 * 4
    assert gpu["teacher"] == 1000 * 4  # a full fp32 copy unless frozen weights are shared
    assert gpu["start model"] == 4000
    shared = estimate(replace(inputs, share_frozen=True)).gpu
    assert shared["teacher"] == 600 * 4 and shared["start model"] == 600 * 4
    frozen_teacher = estimate(replace(inputs, master_bytes=2, frozen_bytes=2, teacher_bytes=2)).gpu
    assert frozen_teacher["teacher"] == 1000 * 2


def test_bf16_masters_halve_weights_gradients_and_optimizer_state_but_not_the_ema():
    gpu = estimate(MemoryInputs(total_parameters=1000, trainable_parameters=1000, master_bytes=2, frozen_bytes=2)).gpu
    assert (gpu["weights"], gpu["gradients"], gpu["optimizer state"], gpu["teacher"]) == (2000, 2000, 4000, 4000)


def test_sharding_divides_the_sharded_terms_and_parks_the_start_model_on_the_host():
    one = estimate(MemoryInputs(total_parameters=8000, trainable_parameters=8000))
    four = estimate(MemoryInputs(total_parameters=8000, trainable_parameters=8000, world_size=4, shard_size=4, gpus_per_host=4))
    for term in ("weights", "gradients", "optimizer state", "teacher"):
        assert four.gpu[term] * 4 == one.gpu[term], term
    assert four.gpu["start model"] == 0
    assert four.host["start model (parked)"] == one.gpu["start model"]  # four shards on one host


def test_offload_moves_the_optimizer_state_to_the_host():
    inputs = MemoryInputs(total_parameters=1000, trainable_parameters=1000, offload_optimizer=True)
    result = estimate(inputs)
    assert result.gpu["optimizer state"] == 0
    assert result.host["optimizer state (offloaded)"] == 2 * 1000 * 4


def test_lora_counts_rank_times_in_plus_out_on_the_targeted_linear_layers():
    census = toy_census()
    # q_proj 16 -> 16 and up_proj 16 -> 64 in each of two blocks; the head is not targeted.
    assert census.lora_parameters(8, ("q_proj",)) == 2 * 8 * (16 + 16)
    assert census.lora_parameters(8, ("q_proj", "up_proj")) == 2 * 8 * (32 + 80)
    assert census.lora_parameters(8, ("proj",)) == 0  # a name matches whole, not as a suffix of a word
    inputs = with_lora(MemoryInputs(total_parameters=census.total, trainable_parameters=census.total), census, 8, ("q_proj",))
    gpu = estimate(inputs).gpu
    adapters = 2 * 8 * 32
    assert inputs.trainable_parameters == adapters and inputs.total_parameters == census.total + adapters
    assert gpu["optimizer state"] == 2 * adapters * 4 and gpu["teacher"] == adapters * 4
    assert gpu["start model"] == adapters * 4  # the frozen base is shared


@pytest.mark.parametrize("shape", [TINY, QWEN_7B], ids=["tiny", "qwen-7b"])
def test_activations_grow_with_rows_and_tokens_and_checkpointing_cuts_them(shape):
    def activations(**kwargs):
        inputs = MemoryInputs(total_parameters=1, trainable_parameters=1, shape=shape, **kwargs)
        result = estimate(inputs)
        return result.activations_without_checkpointing, result.activations_with_checkpointing

    base = activations(rows=1, sequence_tokens=100)
    assert activations(rows=2, sequence_tokens=100) == (2 * base[0], 2 * base[1])
    assert activations(rows=1, sequence_tokens=300) == (3 * base[0], 3 * base[1])
    without, with_ = base
    assert with_ < 0.6 * without
    # Checkpointing keeps one fp32 residual per layer plus one layer's full set.
    per_layer = without // shape.num_layers
    assert with_ == 4 * shape.hidden_size * shape.num_layers * 100 + per_layer
    assert activation_bytes_per_token(shape, 2, False) < activation_bytes_per_token(shape, 4, False)


def test_the_checkpointing_in_effect_is_the_one_counted_in_the_peak():
    inputs = MemoryInputs(total_parameters=1, trainable_parameters=1, shape=QWEN_7B, sequence_tokens=1000, fused_loss=True)
    off, on = estimate(inputs), estimate(replace(inputs, activation_checkpointing=True))
    stage = "the student's forward and backward"
    assert off.gpu_transient[stage]["activations"] == off.activations_without_checkpointing
    assert on.gpu_transient[stage]["activations"] == on.activations_with_checkpointing
    assert on.gpu_peak < off.gpu_peak


def test_the_optimizer_step_and_the_teacher_update_of_narrow_masters():
    inputs = MemoryInputs(total_parameters=1000, trainable_parameters=600)
    stages = estimate(inputs).gpu_transient
    assert stages["the optimizer step"] == {"AdamW temporaries": 600 * 4}
    assert "the teacher update" not in stages  # fp32 masters are not cast
    narrow = estimate(replace(inputs, master_bytes=2, frozen_bytes=2)).gpu_transient
    assert narrow["the teacher update"] == {"student weights in fp32": 600 * 4}
    assert "the teacher update" not in estimate(replace(inputs, master_bytes=2, ema_update=False)).gpu_transient
    assert estimate(replace(inputs, offload_optimizer=True)).gpu_transient["the optimizer step"]["AdamW temporaries"] == 0


def test_kv_caches_of_sampling_and_drawing():
    shape = replace(TINY, visual_thought_tokens=50, visual_thought_passes=3)
    inputs = MemoryInputs(
        total_parameters=1, trainable_parameters=1, shape=shape, sampled_rows=4, sequence_tokens=30, rows=2,
        draws_visual_thoughts=True,
    )  # fmt: skip
    stages = estimate(inputs).gpu_transient
    per_position = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 4  # keys and values, fp32
    assert stages["sampling"]["sampler KV cache"] == 4 * 30 * per_position
    assert stages["drawing visual thoughts"]["drawing KV cache"] == 2 * 3 * 50 * per_position
    assert "drawing visual thoughts" not in estimate(replace(inputs, draws_visual_thoughts=False)).gpu_transient


def test_inputs_from_a_config():
    census = ParameterCensus(groups={"all": 1000}, trainable=1000, bytes_per_element=4)
    config = load_config(
        None,
        (
            "train.samples_per_step=8", "train.grad_accum=2", "sampling.whole_step=true",
            "sampling.max_forward_tokens=512", "sampling.max_completion_tokens=100", "run.precision='bf16'",
            "train.activation_checkpointing=true",
        ),
    )  # fmt: skip
    one = inputs_from_config(config, census, replace(TINY, max_positions=300), 1, fused_loss=False)
    assert (one.rows, one.sampled_rows, one.sequence_tokens, one.completion_tokens) == (8, 16, 300, 101)
    assert one.compute_bytes == 2 and one.sampling_bytes == 4 and one.shard_size == 1
    assert one.teacher_bytes == 4  # the EMA teacher keeps fp32
    assert one.activation_checkpointing and one.share_frozen  # one process checkpoints and shares frozen weights
    four = inputs_from_config(config, census, TINY, 4, fused_loss=False)
    assert (four.rows, four.shard_size, four.sequence_tokens) == (2, 4, 512)
    assert four.activation_checkpointing


def test_the_plan_tries_switches_one_at_a_time_then_together_in_order():
    inputs = MemoryInputs(total_parameters=GIB, trainable_parameters=GIB)
    needed = estimate(inputs).gpu_peak
    halve_weights = Switch("a", lambda i: replace(i, master_bytes=2, frozen_bytes=2))
    offload = Switch("b", lambda i: replace(i, offload_optimizer=True))
    assert plan(inputs, (halve_weights, offload), needed, None).fitting_switches is None
    assert plan(inputs, (halve_weights, offload), needed - 1, None).fitting_switches == (halve_weights,)
    both = estimate(offload.apply(halve_weights.apply(inputs))).gpu_peak
    assert plan(inputs, (halve_weights, offload), both, None).fitting_switches == (halve_weights, offload)
    assert not plan(inputs, (halve_weights, offload), 1, None).fitting_switches


def test_switches_offered_are_those_off_that_take_effect():
    config = load_config(None, ("train.activation_checkpointing=false", "run.precision='fp32'"))
    one = [switch.setting for switch in switches_for(config, 1)]
    assert one == ["train.activation_checkpointing = true", "train.optimizer_offload = true", "run.precision = 'bf16'"]
    settings = [switch.setting for switch in switches_for(config, 8)]
    assert settings == ["train.activation_checkpointing = true", "run.precision = 'bf16'"]


def test_a_run_that_fits_no_switch_is_planned_on_the_fewest_gpus_of_one_host_that_fit():
    census = ParameterCensus(groups={"all": GIB}, trainable=GIB, bytes_per_element=4)
    config = load_config(None, ("train.samples_per_step=8", "run.precision='bf16'"))
    one = estimate(inputs_from_config(config, census, None, 1, fused_loss=True)).gpu_peak
    # Sharded over 4, the held terms are a quarter; the whole model is gathered in bf16 to sample.
    four = estimate(inputs_from_config(config, census, None, 4, fused_loss=True)).gpu_peak
    result = plan_run(config, census, None, 1, True, four, None, can_shard=True)
    assert not result.fits() and result.fitting_switches is None
    assert result.more_gpus == (4, ()) and four < one
    assert plan_run(config, census, None, 1, True, four, None, can_shard=False).more_gpus is None
    nowhere = plan_run(config, census, None, 1, True, 1, None, can_shard=True)
    assert nowhere.more_gpus is None and nowhere.gpus_tried == (2, 4, 8)
