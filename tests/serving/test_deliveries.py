"""DeliveryMemory directly: a redelivery is known, another request with the same id is not, the memory survives a
restart, a forgotten key lets the redelivery count again, and the file stays bounded."""

from __future__ import annotations

from kfloop.serving.deliveries import LOG_NAME, DeliveryMemory, delivery_key


def test_a_redelivery_has_the_same_key_and_another_request_with_the_same_id_does_not():
    assert delivery_key("a-1", b"rows") == delivery_key("a-1", b"rows")
    assert delivery_key("a-1", b"rows") != delivery_key("a-1", b"other rows")
    assert delivery_key("a-1", b"rows").startswith("a-1 ")


def test_keys_survive_a_restart_once_flushed(tmp_path):
    memory = DeliveryMemory(tmp_path)
    first, second = delivery_key("a", b"1"), delivery_key("a", b"2")
    assert memory.remember(first) and memory.remember(second) and not memory.remember(first)
    assert memory.deliveries_of("a") == 2 and memory.unwritten == 2
    memory.flush()
    memory.close()
    again = DeliveryMemory(tmp_path)
    assert first in again and second in again and len(again) == 2 and again.unwritten == 0


def test_a_forgotten_key_is_taken_again_even_after_it_was_written(tmp_path):
    memory = DeliveryMemory(tmp_path)
    key = delivery_key("b", b"x")
    memory.remember(key)
    memory.flush()
    memory.forget(key)
    memory.flush()  # the file is rewritten without it
    memory.close()
    again = DeliveryMemory(tmp_path)
    assert key not in again and again.remember(key)


def test_the_memory_and_its_file_stay_bounded(tmp_path):
    memory = DeliveryMemory(tmp_path, limit=10)
    for n in range(55):
        memory.remember(delivery_key(f"id-{n}", b""))
        memory.flush()
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    assert len(memory) == 10 and len(lines) < 2 * 10
    assert delivery_key("id-54", b"") in memory and delivery_key("id-0", b"") not in memory
    memory.close()
    assert len(DeliveryMemory(tmp_path, limit=10)) == 10
