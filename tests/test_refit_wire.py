"""The refit wire format (refit_wire): the exact bucket layout both sides read, packing and views, dtype
names, and the rendezvous store and group that the collective transport opens."""

import threading

import numpy as np
import pytest
import torch

import refit_wire
from refit_wire import (ALIGNMENT, WeightBucket, bucket_layout, entry_views, host_store, join_store, open_group,
                        pack_buckets, pack_tensors, unpack_bucket)


def named():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, generator=g),  # 12 bytes -> the next entry at 64
            "b": torch.randn(2, 2, generator=g).to(torch.bfloat16),  # 8 bytes
            "c": torch.randn(40, generator=g).to(torch.float16)}  # 80 bytes -> 128 bytes


def test_layout_fields_offsets_and_dtype_names_are_the_wire_format():
    [entry] = bucket_layout(named().items())
    assert entry == {"names": ["a", "b", "c"], "dtypes": ["float32", "bfloat16", "float16"],
                     "shapes": [(3,), (2, 2), (40,)], "offsets": [0, 64, 128], "nbytes": 256}
    assert ALIGNMENT == 64 and refit_wire.DEFAULT_BUCKET_BYTES == 256 << 20
    cast = bucket_layout(named().items(), dtype="bfloat16")[0]
    assert cast["dtypes"] == ["bfloat16"] * 3 and cast["offsets"] == [0, 64, 128] and cast["nbytes"] == 256


def test_buckets_split_by_size_and_a_large_tensor_gets_its_own():
    tensors = {"small1": torch.zeros(8), "big": torch.zeros(100), "small2": torch.zeros(8)}  # 32, 400, 32 bytes
    layout = bucket_layout(tensors.items(), bucket_bytes=128)
    assert [e["names"] for e in layout] == [["small1"], ["big"], ["small2"]]
    assert [e["nbytes"] for e in layout] == [64, 448, 64]
    assert [e["names"] for e in bucket_layout(tensors.items(), bucket_bytes=1024)] == [["small1", "big", "small2"]]


def test_packed_buckets_are_plain_dicts_whose_views_give_the_tensors_back():
    tensors = named()
    buckets = pack_buckets(tensors.items(), bucket_bytes=128)
    assert [b["names"] for b in buckets] == [["a", "b"], ["c"]]
    for b in buckets:
        assert set(b) == {"names", "dtypes", "shapes", "offsets", "data"}
        assert b["data"].dtype == np.uint8 and all(o % ALIGNMENT == 0 for o in b["offsets"])
        for name, view in unpack_bucket(WeightBucket(**b)).items():
            assert view.dtype == tensors[name].dtype and torch.equal(view, tensors[name])
    one = pack_tensors(tensors)  # one bucket: the same bytes as the layout's single bucket
    [single] = pack_buckets(tensors.items())
    assert one.offsets == single["offsets"] and np.array_equal(one.data, single["data"])
    entry = bucket_layout(tensors.items())[0]
    views = entry_views(entry, torch.from_numpy(one.data))
    assert all(torch.equal(views[n], t) for n, t in tensors.items())


def test_read_only_shared_memory_is_viewed_without_a_copy():
    bucket = pack_tensors(named())
    data = bucket.data.copy()
    data.flags.writeable = False  # as Ray's object store hands it over
    views = unpack_bucket(WeightBucket(bucket.names, bucket.dtypes, bucket.shapes, bucket.offsets, data))
    assert views["a"].data_ptr() == data.ctypes.data


def test_unsupported_dtypes_and_malformed_entries_are_refused():
    with pytest.raises(ValueError, match="unsupported weight dtype 'int64'"):
        bucket_layout([("ids", torch.zeros(2, dtype=torch.int64))])
    entry = bucket_layout(named().items())[0]
    raw = torch.zeros(entry["nbytes"], dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside the"):
        entry_views({**entry, "offsets": [0, 64, 192]}, raw)
    with pytest.raises(ValueError, match="not aligned"):
        entry_views({**entry, "offsets": [2, 64, 128]}, raw)
    with pytest.raises(ValueError, match="twice"):
        entry_views({**entry, "names": ["a", "a", "c"]}, raw)


def test_hosted_stores_hold_their_own_ports_and_clients_reach_them():
    first, second = host_store("127.0.0.1"), host_store("127.0.0.1")
    assert first.port != second.port and first.port > 0 and second.port > 0
    client = join_store("127.0.0.1", first.port)
    client.set("key", "from the client")
    assert first.get("key") == b"from the client"


def test_a_group_opens_over_a_hosted_store_and_broadcasts():
    store = host_store("127.0.0.1")
    groups = [None, None]

    def member(rank: int) -> None:
        own = store if rank == 0 else join_store("127.0.0.1", store.port)
        groups[rank] = open_group(own, generation=3, rank=rank, size=2, backend="gloo")

    threads = [threading.Thread(target=member, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(g is not None for g in groups)
    sent, received = torch.arange(4.0), torch.zeros(4)
    works = [groups[0].broadcast(sent, root=0), groups[1].broadcast(received, root=0)]
    for w in works:
        w.wait()
    assert torch.equal(received, sent)
