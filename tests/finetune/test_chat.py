"""Chat data: the assistant-token rule against a hand-built conversation, the folder's own template, malformed
lines, the truncation rule, and packing (packed rows give each conversation the loss it has alone)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_glm.data.tokenizer import open_tokenizer
from megatron_glm.errors import DataError
from megatron_glm.finetune.chat import ChatStats, Conversation, encode_conversations, fit, read_chat_file
from megatron_glm.finetune.chat_template import GLM4_CHAT_TEMPLATE, ChatTemplate, _folder_tokenizer
from megatron_glm.finetune.encode import collate_rows
from megatron_glm.finetune.packing import chat_rows
from megatron_glm.model import GLMModel, batch_attention_mask
from megatron_glm.model.loss import glm_loss

SYSTEM = {"role": "system", "content": "Be brief."}


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    out = []
    for user, assistant in pairs:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out


@pytest.fixture(scope="module")
def tok(chat_setup: dict):
    return open_tokenizer(chat_setup["release"])


def test_loss_mask_covers_exactly_the_assistant_tokens(chat_setup: dict, tok) -> None:
    """The hand-built rendering of GLM-4's format, and the targets GLM-4 trains: each reply (``\\n`` + content) and
    the token after it (the next turn's role token, or the end of text)."""
    template = ChatTemplate(chat_setup["release"], tok)
    assert template.template == GLM4_CHAT_TEMPLATE and template.source == "the built-in GLM-4"
    messages = [SYSTEM, *_turns(("Hi", "Hello"), ("Bye", "Ok")), {"role": "observation", "content": "[1]"}]
    messages.append({"role": "assistant", "content": "Done."})
    sp = {t: tok.token_to_id(t) for t in ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>")}
    sp["<|observation|>"], eos = tok.token_to_id("<|observation|>"), tok.eos_id
    text = lambda s: tok.encode(s, allow_special=False)
    context = lambda *ids: [(i, 0) for i in ids]
    target = lambda *ids: [(i, 1) for i in ids]
    want = [
        *context(sp["[gMASK]"], sp["<sop>"], sp["<|system|>"], *text("\nBe brief."), sp["<|user|>"], *text("\nHi")),
        *context(sp["<|assistant|>"]),
        *target(*text("\nHello"), sp["<|user|>"]),
        *context(*text("\nBye"), sp["<|assistant|>"]),
        *target(*text("\nOk"), sp["<|observation|>"]),
        *context(*text("\n[1]"), sp["<|assistant|>"]),
        *target(*text("\nDone."), eos),
    ]
    enc = template.conversation(messages, None, "x")
    assert list(zip(enc.ids, enc.targets)) == want
    assert tok.decode([i for i, t in want if t]).count("Hello") == 1
    # The rendering is transformers' apply_chat_template of the folder: the same ids from its own tokenizer.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(chat_setup["release"]))
    ids = hf.apply_chat_template(messages, chat_template=GLM4_CHAT_TEMPLATE, tokenize=False)
    assert hf(ids, add_special_tokens=False)["input_ids"] + [eos] == enc.ids
    # A single-file tokenizer renders the same built-in template.
    assert ChatTemplate(chat_setup["tokenizer_file"], tok).conversation(messages, None, "x") == enc
    # tools reach the template (a first system turn listing them), context only.
    tools = [{"name": "search", "parameters": {"q": "str"}}]
    with_tools = template.conversation(messages, tools, "x")
    assert '"name": "search"' in tok.decode(with_tools.ids) and sum(with_tools.targets) == sum(enc.targets)


def test_the_folders_own_template_is_used(chat_setup: dict, tok, tmp_path: Path) -> None:
    folder = tmp_path / "templated"
    shutil.copytree(chat_setup["release"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    own = "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    own += "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": own}))
    template = ChatTemplate(folder, tok)
    assert template.template == own and "templated's own" in template.source
    enc = template.conversation(_turns(("Hi", "Hello")), None, "x")
    a = tok.token_to_id("<|assistant|>")
    assert enc.ids == [*tok.encode("[gMASK]<sop><|user|>Hi<|assistant|>Hello"), tok.eos_id]  # no "\n": its own
    start = enc.ids.index(a) + 1
    assert enc.targets == [0] * start + [1] * (len(enc.ids) - start)
    # A remote-code folder (GLM-4-9B-chat's kind: a tiktoken file and its own tokenizer class) that transformers
    # does not open without remote code: its chat_template.jinja is rendered all the same.
    remote = tmp_path / "remote"
    remote.mkdir()
    auto = {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}
    (remote / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "ChatGLM4Tokenizer", "auto_map": auto})
    )
    (remote / "chat_template.jinja").write_text(own)
    assert _folder_tokenizer(remote) is None
    template = ChatTemplate(remote, tok)
    assert template.template == own and template.conversation(_turns(("Hi", "Hello")), None, "x") == enc


BAD = {
    '{"messages": [{"role": "robot", "content": "x"}]}': "message 0 has role 'robot'; expected one of system, user",
    '{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}': "message 0 (user) has no 'content'",
    '{"messages": [{"role": "user", "content": 3}]}': "message 0 (user): 'content' must be a string, got int",
    '{"messages": [{"role": "user", "content": "x"}]}': "no assistant turn with content",
    '{"messages": []}': "'messages' must be a non-empty list",
    '{"messages": [{"role": "user", "content": "x"}': "not valid JSON",
    "[1, 2]": "expected a JSON object with 'messages', got list",
    '{"messages": [{"role": "assistant", "content": "y"}], "tools": 5}': "'tools' must be a list, got int",
}


@pytest.mark.parametrize("line", list(BAD))
def test_malformed_conversations_are_one_line_errors_with_the_line(line: str, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": _turns(("a", "b"))})
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(DataError) as err:
        read_chat_file(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}:3: ") and BAD[line] in message, message


def test_long_conversations_lose_their_earliest_rounds_then_are_cut(chat_setup: dict, tok) -> None:
    template = ChatTemplate(chat_setup["release"], tok)
    long = "a fairly long question about the for statement and its else clause " * 2
    rounds = [(long + str(i), f"Answer {i}.") for i in range(4)]
    conv = Conversation((SYSTEM, *_turns(*rounds)), line=7)
    full = template.conversation(list(conv.messages), None, "x")
    last_two = template.conversation([SYSTEM, *_turns(*rounds[2:])], None, "x")
    stats = ChatStats()
    got = fit(conv, template, len(last_two.ids) - 1, "x", stats)  # room for exactly the last two rounds
    assert len(full.ids) > len(last_two.ids) and got == last_two
    assert (stats.kept, stats.shortened, stats.dropped_rounds, stats.cut) == (1, 1, 2, 0)
    last = template.conversation([SYSTEM, *_turns(rounds[3])], None, "x")
    got = fit(conv, template, len(last.ids) - 3, "x", stats)  # not even the last round: cut, last 2 labels lost
    assert got is not None and got.ids == last.ids[:-2] and got.targets == last.targets[:-2]
    assert (stats.cut, stats.dropped_rounds) == (1, 5)
    prompt = template.encode([SYSTEM, {"role": "user", "content": rounds[3][0]}], None, True)
    assert fit(conv, template, len(prompt) - 1, "x", stats) is None and stats.skipped == [7]  # no target left
    assert "1 skipped with no assistant token left" in stats.summary()


def test_packed_rows_give_each_conversation_its_own_loss(chat_setup: dict, tok) -> None:
    """Several conversations per row (document isolation, positions restarting) against one per row: the same
    loss of every token, so the same per-conversation losses (fp32, 1e-5)."""
    from tests.model.helpers import family_config

    template = ChatTemplate(chat_setup["release"], tok)
    conversations = read_chat_file(chat_setup["train"])[:12]
    length = 256
    encoded, _ = encode_conversations(conversations, template, length, "x")
    packed, single = (chat_rows(encoded, length, tok.pad_id, pack) for pack in (True, False))
    assert len(single) == len(encoded) and len(packed) <= len(single) / 2  # several conversations share a row
    model = GLMModel(family_config("chatglm2-6b", vocab_size=2048, max_sequence_length=length), seed=3).eval()

    def per_conversation(rows: list) -> dict[tuple, torch.Tensor]:
        """Each conversation's (by its tokens) per-token losses."""
        batch = collate_rows(rows)
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["position_ids"], batch_attention_mask(batch))
        per_token = glm_loss(logits, batch["labels"], batch["loss_mask"]).per_token
        if "doc_ids" in batch:
            doc = batch["doc_ids"]
        else:  # one conversation per row, its positions 0..n-1 first
            pos = batch["position_ids"][:, 0]
            doc = torch.where(torch.arange(length) <= pos.argmax(dim=1, keepdim=True), 0, -1)
        out = {}
        for r in range(per_token.shape[0]):
            for d in range(int(doc[r].max()) + 1):
                out[tuple(batch["input_ids"][r][doc[r] == d].tolist())] = per_token[r][doc[r] == d]
        return out

    a, b = per_conversation(packed), per_conversation(single)
    assert len(a) == len(b) == len(encoded) and set(a) == set(b)
    mean = lambda t, key: float(t.sum()) / sum(encoded_targets[key])
    encoded_targets = {tuple(e.ids[:-1]): e.targets[1:] for e in encoded}
    assert min(mean(b[k], k) for k in b) > 1.0
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # every token's loss
    assert max(abs(mean(a[k], k) - mean(b[k], k)) for k in a) < 1e-5  # so each conversation's mean loss
    first = collate_rows(packed[:1])
    docs = int(first["doc_ids"][0].max()) + 1
    assert docs >= 2 and first["position_ids"][0, 0].tolist().count(0) >= docs
    # Without isolation the packed conversations would see each other: the check above can fail.
    alone = [a[tuple(first["input_ids"][0][first["doc_ids"][0] == d].tolist())] for d in range(docs)]
    with torch.no_grad():
        leaky = model(first["input_ids"], first["position_ids"], first["sep"])
    loss = glm_loss(leaky, first["labels"], first["loss_mask"]).per_token[0]
    assert (loss[first["doc_ids"][0] == docs - 1] - alone[-1]).abs().max() > 1e-3
