"""Tiny federated datasets in the real formats: a LEAF Sent140 JSON file and Gutenberg-layout Shakespeare plays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WORDS = ["good", "bad", "happy", "sad", "love", "hate", "great", "awful", "fun", "boring", "nice", "ugly"]


def write_sent140(root: Path, num_users: int = 4, samples: tuple[int, ...] = (4, 6, 8, 12)) -> Path:
    """``root/data/test/all_data.json`` in LEAF's layout: users with tweets whose words predict the label."""
    folder = root / "data" / "test"
    folder.mkdir(parents=True, exist_ok=True)
    users, counts, user_data = [], [], {}
    for u in range(num_users):
        name = f"user{u}"
        n = samples[u % len(samples)]
        xs, ys = [], []
        for i in range(n):
            label = (u + i) % 2
            words = [WORDS[(2 * ((i + j + u) % 6)) + (1 - label)] for j in range(3 + u % 3)]
            text = f"@friend{u} " + " ".join(words) + f" day{i}"
            xs.append([str(1000 * u + i), "Sat May 16 22:18:35 PDT 2009", "NO_QUERY", name, text, "training"])
            ys.append(label)
        users.append(name)
        counts.append(n)
        user_data[name] = {"x": xs, "y": ys}
    path = folder / "all_data.json"
    path.write_text(json.dumps({"users": users, "num_samples": counts, "user_data": user_data}))
    return root


def leaf_doc(**overrides: Any) -> dict[str, Any]:
    """A valid one-user LEAF document, with keys replaced or removed (value None) by ``overrides``."""
    doc: dict[str, Any] = {
        "users": ["a"],
        "num_samples": [2],
        "user_data": {
            "a": {"x": [["1", "d", "q", "a", "hi there", "t"], ["2", "d", "q", "a", "bye", "t"]], "y": [1, 0]}
        },
    }
    for key, value in overrides.items():
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
    return doc


MODERN_PLAY = """THE TRAGEDY OF TESTUS

ACT I.

Scene I. A room.

[Enter Alpha and Beta.]

Alp.
{alpha}
And more words for the first speaker to say here.

Bet.
{beta}

Alp.
Again I speak, and speak again, for I am Alpha.

[Exit.]
"""

FOLIO_PLAY = """The Tragedie of Gamma

Actus Primus. Scoena Prima.

Enter Gamma and Delta.

  Gam. {gamma}
and so it goes on the next line

  Del. {delta}

Exeunt.
"""


def write_shakespeare(root: Path, repeat: int = 6) -> Path:
    """Two plays: a modern-layout one (plus its Folio twin, which must be skipped) and a Folio-only one."""
    root.mkdir(parents=True, exist_ok=True)
    line = "Now is the winter of our discontent made glorious summer by this sun of York. "
    (root / "testus_gut.txt").write_text(
        MODERN_PLAY.format(alpha=line * repeat, beta="Short reply, my lord. " * repeat)
    )
    (root / "testus_gut_f.txt").write_text(FOLIO_PLAY.format(gamma="Folio twin " * repeat, delta="skip me " * repeat))
    (root / "gamma_gut_f.txt").write_text(
        FOLIO_PLAY.format(gamma="What light through yonder window breaks? " * repeat, delta="It is the east. " * repeat)
    )
    (root / "sonnets_gut.txt").write_text("THE SONNETS\n\nFrom fairest creatures we desire increase,\n")
    return root


class LocalGrid:
    """An in-process Flower ``Grid``: messages go straight to a real ``ClientApp`` (no Ray), one node per user.

    Args:
        client_app: the ClientApp under test.
        num_nodes: connected nodes (node i holds partition-id i).
        crash: partition ids whose client raises (the reply is an error message, as Flower sends one).
    """

    def __init__(self, client_app: Any, num_nodes: int, crash: frozenset[int] = frozenset()) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        # What Flower's ServerApp runtime sets for the process before the app builds messages (the server's ids).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.app, self.crash = client_app, crash
        self.nodes = {1000 + i: i for i in range(num_nodes)}
        self.sent: list[list[int]] = []  # partition ids messaged, per round

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        from flwr.app import Context, Error, RecordDict

        replies, sent = [], []
        for msg in messages:
            pid = self.nodes[msg.metadata.dst_node_id]
            sent.append(pid)
            if pid in self.crash:
                replies.append(msg.create_error_reply(Error(code=1, reason=f"client {pid} crashed")))
                continue
            context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={"partition-id": pid},
                              state=RecordDict(), run_config={})  # fmt: skip
            replies.append(self.app(msg, context))
        self.sent.append(sent)
        return replies


REDDIT_WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "park", "i", "like", "this", "game", "a", "lot"]


def write_reddit(root: Path, num_users: int = 4, comments: tuple[int, ...] = (3, 4, 6, 8), chunk: int = 10) -> Path:
    """``root/data/test/all_data.json`` in LEAF's Reddit layout, and ``root/vocab.txt`` (one word per line).

    Each comment is ``<BOS> words <EOS>`` cut into ``chunk``-token lists padded with ``<PAD>``; ``y`` holds the
    same chunks shifted by one as ``target_tokens`` (with LEAF's ``count_tokens`` masks). User u repeats the
    pattern ``REDDIT_WORDS[u:]`` so users differ in vocabulary; the last word of the list is out of vocabulary.
    """
    folder = root / "data" / "test"
    folder.mkdir(parents=True, exist_ok=True)
    users, counts, user_data = [], [], {}
    for u in range(num_users):
        name = f"redditor{u}"
        words = REDDIT_WORDS[u : u + 5 + 2 * u]
        xs, ys = [], []
        for c in range(comments[u % len(comments)]):
            tokens = ["<BOS>", *[words[(c + j) % len(words)] for j in range(4 + c % 5)], "<EOS>"]
            chunks = [tokens[i : i + chunk] for i in range(0, len(tokens) - 1, chunk)]
            targets = [tokens[i + 1 : i + 1 + chunk] for i in range(0, len(tokens) - 1, chunk)]
            xs.append([ch + ["<PAD>"] * (chunk - len(ch)) for ch in chunks])
            ys.append({
                "target_tokens": [t + ["<PAD>"] * (chunk - len(t)) for t in targets],
                "count_tokens": [[1] * len(t) + [0] * (chunk - len(t)) for t in targets],
            })  # fmt: skip
        users.append(name)
        counts.append(len(xs))
        user_data[name] = {"x": xs, "y": ys}
    (folder / "all_data.json").write_text(json.dumps({"users": users, "num_samples": counts, "user_data": user_data}))
    (root / "vocab.txt").write_text("\n".join(["<BOS>", "<EOS>", *REDDIT_WORDS[:-1]]) + "\n")
    return root
