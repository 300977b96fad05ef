"""The chat template comes from the model (HF folder or GGUF) or from `--chat-template
FILE`; a model with neither answers chat requests with a 400 that names the flag.

A real gateway (uvicorn, real ZeroMQ) in front of the gateway tests' scripted scheduler:
what is under test is the gateway's templating, which happens before any scheduling.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pagedserve.services.cli import build_parser, subcommand_parser
from pagedserve.services.config_flags import config_argv, config_from_args
from pagedserve.services.launcher import GATEWAY_FIELDS_NOT_IN_ARGV
from pagedserve.services.gateway.config import GatewayConfig, gateway_config_from_args
from pagedserve.shared.model_source import resolve_model_source
from pagedserve.shared.tokenizer import load_tokenizer, read_chat_template
from tests.engine.family_models import tiny_tokenizer
from tests.gateway.conftest import running_gateway
from tests.gateway.fake_scheduler import FakeScheduler

MESSAGES = [{"role": "user", "content": "The capital of France is"}]
# A template of our own, told apart from any model's by its markers.
FILE_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def _model_folder(folder: Path, with_template: bool) -> Path:
    """What the gateway reads of an HF folder: config.json and the tokenizer (no weights)."""
    from transformers import AutoConfig

    tokenizer = tiny_tokenizer()
    if not with_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    AutoConfig.for_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def untemplated_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder whose tokenizer carries no chat template."""
    folder = _model_folder(tmp_path_factory.mktemp("no-template"), with_template=False)
    assert not (folder / "chat_template.jinja").exists()
    return folder


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text(FILE_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeScheduler]:
    scheduler = FakeScheduler()
    yield scheduler
    scheduler.close()


def _gateway(fake: FakeScheduler, folder: Path, chat_template: Path | None):  # type: ignore[no-untyped-def]
    config = GatewayConfig(
        scheduler_address=fake.address, model=str(folder), chat_template=None if chat_template is None else str(chat_template)
    )
    return running_gateway(config, load_tokenizer(resolve_model_source(str(folder))))


def test_chat_without_any_template_is_a_400_naming_the_flag(fake: FakeScheduler, untemplated_folder: Path) -> None:
    fake.reset()
    with _gateway(fake, untemplated_folder, None) as url, httpx.Client(base_url=url, timeout=20) as client:
        for path, body in [("/v1/chat/completions", {"messages": MESSAGES}), ("/tokenize", {"messages": MESSAGES})]:
            response = client.post(path, json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert "--chat-template" in error["message"] and error["param"] == "messages"
        # Raw prompts need no template.
        assert client.post("/tokenize", json={"prompt": "The capital"}).status_code == 200
    assert fake.submits == []


def test_chat_template_file_renders_the_conversation(fake: FakeScheduler, untemplated_folder: Path, template_file: Path) -> None:
    fake.reset()
    tokenizer = load_tokenizer(resolve_model_source(str(untemplated_folder)), str(template_file))
    expected = tokenizer("[user] The capital of France is\n[assistant] ", add_special_tokens=False).input_ids
    with _gateway(fake, untemplated_folder, template_file) as url, httpx.Client(base_url=url, timeout=20) as client:
        response = client.post("/tokenize", json={"messages": MESSAGES})
        assert response.status_code == 200, response.text
        assert response.json()["tokens"] == expected


def test_model_templates_come_from_the_folder_and_a_file_replaces_them(tmp_path: Path, template_file: Path) -> None:
    source = resolve_model_source(str(_model_folder(tmp_path, with_template=True)))
    assert "<|im_start|>" in load_tokenizer(source).chat_template
    assert load_tokenizer(source, str(template_file)).chat_template == FILE_TEMPLATE


def test_unreadable_template_file_is_refused_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jinja"
    with pytest.raises(ValueError, match="nope.jinja"):
        read_chat_template(str(missing))
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_chat_template(str(tmp_path / "empty.jinja"))


@pytest.mark.parametrize("command", ["up", "gateway", "generate"])
def test_every_serving_command_takes_the_flag(command: str, template_file: Path) -> None:
    extra = ["prompt"] if command == "generate" else []
    args = build_parser().parse_args([command, "--chat-template", str(template_file), *extra])
    assert args.chat_template == str(template_file)
    if command == "gateway":
        assert gateway_config_from_args(args).chat_template == str(template_file)
    if command == "up":  # `up` hands its gateway the flag (services/launcher.py)
        gateway = config_from_args(GatewayConfig, args, redis_url=None)
        argv = config_argv(gateway, subcommand_parser("gateway"), exclude=GATEWAY_FIELDS_NOT_IN_ARGV)
        assert argv[argv.index("--chat-template") + 1] == str(template_file)


def test_generate_chat_takes_the_template_file(tmp_path: Path, template_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pagedserve generate --chat`: refused naming the flag without a template, rendered
    with the file's template with --chat-template."""
    import json

    from pagedserve.services.cli import main
    from tests.engine.family_models import build_hf_folder

    folder = build_hf_folder("llama", tmp_path / "model")
    (folder / "chat_template.jinja").unlink()
    base = ["generate", "--model", str(folder), "--dtype", "float32", "--chat", "--max-tokens", "2", "--json", "Hello"]
    with pytest.raises(SystemExit) as exit_code:
        main(base)
    assert exit_code.value.code == 1 and "--chat-template" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_code:
        main([*base, "--chat-template", str(template_file)])
    assert exit_code.value.code == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert len(json.loads(line)["token_ids"]) == 2
