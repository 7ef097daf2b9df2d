"""The generation ledger: the one writer of the current pointer and of change notices."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
from safetensors.numpy import save

from federation_grpc.errors import FailedPrecondition
from federation_grpc.hub.generations import NewGeneration
from federation_grpc.hub.service import HubService

from .conftest import MODEL_CONFIG, hub_config, small_model

REPO = Path(__file__).resolve().parents[2]


def test_a_watcher_wakes_when_a_publish_commits(service: HubService) -> None:
    ledger = service.ledger
    known = ledger.state_version()
    seen: list[int] = []
    waiter = threading.Thread(target=lambda: seen.append(ledger.wait_for_change(known, 120)))
    waiter.start()
    # the waiter may not be waiting yet; publishing again until it has seen a change
    # keeps the test free of timing assumptions, while a publish that never wakes
    # anyone leaves it waiting out its 120 s.
    for _ in range(50):
        ledger.promote(0)
        waiter.join(timeout=0.2)
        if not waiter.is_alive():
            break
    waiter.join(timeout=5)
    assert not waiter.is_alive(), "publish did not wake the watcher"
    assert seen and seen[0] > known  # it reads the committed version, not the old one


def test_a_publish_whose_transaction_rolls_back_changes_nothing(service: HubService) -> None:
    ledger = service.ledger
    before = (ledger.current_number(), ledger.state_version(), ledger.list_generations())
    view = ledger.generation(0)
    with pytest.raises(RuntimeError, match="abandoned"), service.store.session() as session:
        number = ledger.publish(
            session, NewGeneration(0, view.sha256, view.size_bytes, MODEL_CONFIG, "test")
        )
        assert number == 1
        raise RuntimeError("abandoned")
    assert (ledger.current_number(), ledger.state_version(), ledger.list_generations()) == before


def test_generation_zero_is_published_once(tmp_path: Path) -> None:
    service = HubService(hub_config(tmp_path))
    try:
        assert service.ledger.state_version() == 0
        assert service.init_model(save(small_model()), MODEL_CONFIG).current
        assert (service.current_number(), service.state_version()) == (0, 1)
        with pytest.raises(FailedPrecondition, match="already has generations"):
            service.init_model(save(small_model(1)), MODEL_CONFIG)
    finally:
        service.close()


def test_only_the_ledger_moves_the_current_pointer_and_stores_generations() -> None:
    writers, makers = [], []
    for path in sorted((REPO / "federation_grpc").rglob("*.py")):
        if "_proto" in path.parts or "migrations" in path.parts:
            continue
        where = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "GenerationRow":
                makers.append(where)
            targets = (
                node.targets if isinstance(node, ast.Assign)
                else [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
            )
            for target in targets:
                for part in ast.walk(target):
                    if isinstance(part, ast.Attribute) and part.attr == "current_generation":
                        writers.append(where)
    assert writers == ["federation_grpc/hub/generations.py"]
    assert makers == ["federation_grpc/hub/generations.py"]
