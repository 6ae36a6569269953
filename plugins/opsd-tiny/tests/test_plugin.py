"""The plugin's registration and params: light to import, strict to validate."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from opsd_core.api import Registry
from opsd_tiny import context, plugin
from opsd_tiny.config import FrozenLakeParams, TinyBackendParams
from opsd_tiny.vocab import Vocab


def test_hooks_register_lazy_factories():
    backends, tasks = Registry("backend"), Registry("task")
    plugin.register_backends(backends)
    plugin.register_tasks(tasks)
    assert backends.get("tiny-umm").factory == "opsd_tiny.backend:TinyBackend"
    assert backends.get("tiny-umm").params is TinyBackendParams
    assert tasks.get("frozen-lake").factory == "opsd_tiny.task:FrozenLakeTask"
    assert tasks.create("frozen-lake", FrozenLakeParams()).params.size == 5


def test_registering_imports_no_torch():
    code = (
        "import sys; from opsd_core.api import Registry; from opsd_tiny import plugin; "
        "plugin.register_backends(Registry('backend')); plugin.register_tasks(Registry('task')); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_params_describe_every_field_and_reject_unknown_keys():
    for model in (TinyBackendParams, FrozenLakeParams):
        assert all(field.description for field in model.model_fields.values()), model
        with pytest.raises(ValidationError, match="extra"):
            model(unknown=1)


@pytest.mark.parametrize(
    "model, values",
    [
        (FrozenLakeParams, {"min_path": 8, "max_path": 4}),
        (FrozenLakeParams, {"hole_probability": 0.9}),
        (FrozenLakeParams, {"detour_probability": 1.5}),
        (TinyBackendParams, {"free_text": "keep"}),
        (TinyBackendParams, {"device": "cpu"}),  # run.device is the one device setting
    ],
)
def test_bad_params_are_rejected(model, values):
    with pytest.raises(ValidationError):
        model(**values)


def test_the_vocabulary_covers_every_prompt_text():
    vocab = Vocab.for_grid(5)
    for text in (context.SYSTEM, context.QUESTION, context.REF_INTRO, context.TRANSITION):
        vocab.encode(text)
    with pytest.raises(ValueError, match="duplicate"):
        Vocab([*vocab.tokens, "R"])
