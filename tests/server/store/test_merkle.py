"""Check the Merkle tree module against a naive recursive RFC 6962 reference."""

import hashlib
from functools import cache

import pytest

from server.store.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    nodes_completed_by,
    root_from_leaves,
    root_hash,
    subtree_hash,
    verify_consistency,
    verify_inclusion,
)

MAX_SIZE = 70
MAX_PROOF_SIZE = 40

# Leaf data: one 32-byte record hash per leaf, as the audit store uses.
RECORDS = [hashlib.sha256(f"record {i}".encode()).digest() for i in range(MAX_SIZE)]
LEAVES = [leaf_hash(record) for record in RECORDS]


# Reference: RFC 6962 section 2.1 written as literally as possible over a list of leaf data.


def reference_mth(data: list[bytes]) -> bytes:
    if not data:
        return hashlib.sha256(b"").digest()
    if len(data) == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = reference_split(len(data))
    return hashlib.sha256(b"\x01" + reference_mth(data[:k]) + reference_mth(data[k:])).digest()


def reference_split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def reference_path(m: int, data: list[bytes]) -> list[bytes]:
    if len(data) == 1:
        return []
    k = reference_split(len(data))
    if m < k:
        return reference_path(m, data[:k]) + [reference_mth(data[k:])]
    return reference_path(m - k, data[k:]) + [reference_mth(data[:k])]


def reference_proof(m: int, data: list[bytes]) -> list[bytes]:
    return reference_subproof(m, data, True)


def reference_subproof(m: int, data: list[bytes], whole_tree: bool) -> list[bytes]:
    n = len(data)
    if m == n:
        return [] if whole_tree else [reference_mth(data)]
    k = reference_split(n)
    if m <= k:
        return reference_subproof(m, data[:k], whole_tree) + [reference_mth(data[k:])]
    return reference_subproof(m - k, data[k:], False) + [reference_mth(data[:k])]


@cache
def reference_nodes(size: int) -> dict[tuple[int, int], bytes]:
    """Return every perfect node of the first ``size`` leaves, keyed by (level, index)."""
    nodes = {}
    level = 0
    while 2**level <= size:
        width = 2**level
        for index in range(size // width):
            nodes[(level, index)] = reference_mth(RECORDS[index * width : (index + 1) * width])
        level += 1
    return nodes


class NodeTable:
    """A node lookup over the perfect nodes of one tree size that counts its lookups.

    A lookup outside that tree raises KeyError, so a test fails if the module
    reads a node the store would not have yet.
    """

    def __init__(self, size: int) -> None:
        self.nodes = reference_nodes(size)
        self.lookups = 0

    def __call__(self, level: int, index: int) -> bytes:
        self.lookups += 1
        return self.nodes[(level, index)]


def flip_byte(value: bytes) -> bytes:
    return bytes([value[0] ^ 0x01]) + value[1:]


# Known answers


def test_empty_root_known_answer():
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root_hash(0, NodeTable(0)) == EMPTY_ROOT
    assert root_from_leaves([]) == EMPTY_ROOT


def test_leaf_hash_known_answer():
    assert leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"


def test_node_hash_uses_interior_prefix():
    left, right = LEAVES[0], LEAVES[1]
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()
    assert node_hash(left, right) == reference_mth(RECORDS[:2])


# Roots


def test_root_hash_matches_reference():
    for size in range(1, MAX_SIZE + 1):
        assert root_hash(size, NodeTable(size)) == reference_mth(RECORDS[:size]), f"size {size}"


def test_root_hash_lookups_one_per_set_bit():
    for size in range(1, MAX_SIZE + 1):
        table = NodeTable(size)
        root_hash(size, table)
        assert table.lookups == size.bit_count(), f"size {size}"


def test_root_from_leaves_matches_reference():
    for size in range(MAX_SIZE + 1):
        leaves = (leaf for leaf in LEAVES[:size])  # a generator, as a streaming verifier passes
        assert root_from_leaves(leaves) == reference_mth(RECORDS[:size]), f"size {size}"


def test_root_from_leaves_rejects_short_leaf():
    with pytest.raises(ValueError, match=r"^leaf 2 is 31 bytes: expected a 32-byte SHA-256 hash$"):
        root_from_leaves([LEAVES[0], LEAVES[1], LEAVES[2][:31]])


def test_subtree_hash_matches_reference():
    size = 20
    table = NodeTable(size)
    for start in range(size):
        for end in range(start + 1, size + 1):
            expected = reference_mth(RECORDS[start:end])
            assert subtree_hash(start, end, table, tree_size=size) == expected, f"range [{start}, {end})"


def test_subtree_hash_rejects_invalid_range():
    table = NodeTable(8)
    with pytest.raises(ValueError, match=r"^leaf range \[3, 3\) is invalid: expected 0 <= start < end$"):
        subtree_hash(3, 3, table)
    with pytest.raises(ValueError, match=r"^leaf range \[-1, 2\) is invalid: expected 0 <= start < end$"):
        subtree_hash(-1, 2, table)
    with pytest.raises(ValueError, match=r"^end 9 is beyond the tree of 8 leaves: expected 1 <= end <= 8$"):
        subtree_hash(0, 9, table, tree_size=8)


def test_root_hash_rejects_invalid_size():
    table = NodeTable(8)
    with pytest.raises(ValueError, match=r"^size -1 is out of range: expected size >= 0$"):
        root_hash(-1, table)
    with pytest.raises(ValueError, match=r"^size 9 is beyond the tree of 8 leaves: expected 0 <= size <= 8$"):
        root_hash(9, table, tree_size=8)


# Appending leaves


def test_nodes_completed_by_builds_every_perfect_node():
    nodes: dict[tuple[int, int], bytes] = {}
    for index, leaf in enumerate(LEAVES):
        completed = nodes_completed_by(index, leaf, lambda level, position: nodes[(level, position)])
        nodes[(0, index)] = leaf
        for level, position, value in completed:
            assert (level, position) not in nodes, f"node ({level}, {position}) completed twice"
            nodes[(level, position)] = value
        assert nodes == reference_nodes(index + 1), f"after appending leaf {index}"


def test_nodes_completed_by_one_per_trailing_one_bit():
    nodes = reference_nodes(MAX_SIZE)
    for index in (0, 1, 2, 3, 7, 8, 15, 31, 62, 63):
        completed = nodes_completed_by(index, LEAVES[index], lambda level, position: nodes[(level, position)])
        trailing_ones = (index ^ (index + 1)).bit_length() - 1
        assert [level for level, _, _ in completed] == list(range(1, trailing_ones + 1)), f"index {index}"


def test_nodes_completed_by_rejects_invalid_input():
    nodes = reference_nodes(4)
    with pytest.raises(ValueError, match=r"^leaf index -1 is invalid: expected index >= 0$"):
        nodes_completed_by(-1, LEAVES[0], lambda level, position: nodes[(level, position)])
    with pytest.raises(ValueError, match=r"^leaf is 33 bytes: expected a 32-byte SHA-256 hash$"):
        nodes_completed_by(1, LEAVES[1] + b"\x00", lambda level, position: nodes[(level, position)])


# Inclusion proofs


def test_inclusion_proof_matches_reference():
    for size in range(1, MAX_PROOF_SIZE + 1):
        table = NodeTable(size)
        root = reference_mth(RECORDS[:size])
        for index in range(size):
            proof = inclusion_proof(index, size, table, tree_size=size)
            assert proof == reference_path(index, RECORDS[:size]), f"index {index}, size {size}"
            assert verify_inclusion(LEAVES[index], index, size, proof, root), f"index {index}, size {size}"


def test_inclusion_proof_lookups_logarithmic():
    for size in range(1, MAX_SIZE + 1):
        for index in range(size):
            table = NodeTable(size)
            inclusion_proof(index, size, table)
            assert table.lookups <= 2 * size.bit_length(), f"index {index}, size {size}"


def test_inclusion_proof_rejects_invalid_arguments():
    table = NodeTable(8)
    with pytest.raises(
        ValueError, match=r"^leaf index 5 is out of range for a tree of size 5: expected 0 <= index < 5$"
    ):
        inclusion_proof(5, 5, table)
    with pytest.raises(
        ValueError, match=r"^leaf index -1 is out of range for a tree of size 5: expected 0 <= index < 5$"
    ):
        inclusion_proof(-1, 5, table)
    with pytest.raises(ValueError, match=r"^size 0 is out of range: expected size >= 1$"):
        inclusion_proof(0, 0, table)
    with pytest.raises(ValueError, match=r"^size 9 is beyond the tree of 8 leaves: expected 1 <= size <= 8$"):
        inclusion_proof(0, 9, table, tree_size=8)


def test_inclusion_tampered_proof_rejected():
    for size in range(1, 21):
        root = reference_mth(RECORDS[:size])
        for index in range(size):
            leaf = LEAVES[index]
            proof = reference_path(index, RECORDS[:size])
            case = f"index {index}, size {size}"

            for position in range(len(proof)):
                flipped = proof[:position] + [flip_byte(proof[position])] + proof[position + 1 :]
                assert not verify_inclusion(leaf, index, size, flipped, root), f"{case}, flipped {position}"
                dropped = proof[:position] + proof[position + 1 :]
                assert not verify_inclusion(leaf, index, size, dropped, root), f"{case}, dropped {position}"
            assert not verify_inclusion(leaf, index, size, proof + [LEAVES[0]], root), f"{case}, extra hash"
            assert not verify_inclusion(leaf, index, size, [LEAVES[0]] + proof, root), f"{case}, extra first hash"
            assert not verify_inclusion(flip_byte(leaf), index, size, proof, root), f"{case}, wrong leaf"
            assert not verify_inclusion(leaf, index, size, proof, flip_byte(root)), f"{case}, wrong root"

            for other_index in range(size):
                if other_index != index:
                    assert not verify_inclusion(leaf, other_index, size, proof, root), f"{case}, as {other_index}"
            for other_size in range(index + 1, 25):
                if other_size != size:
                    other_root = reference_mth(RECORDS[:other_size])
                    assert not verify_inclusion(leaf, index, other_size, proof, other_root), (
                        f"{case}, as size {other_size}"
                    )


def test_inclusion_out_of_range_rejected():
    proof = reference_path(2, RECORDS[:5])
    root = reference_mth(RECORDS[:5])
    assert not verify_inclusion(LEAVES[2], -1, 5, proof, root)
    assert not verify_inclusion(LEAVES[2], 5, 5, proof, root)
    assert not verify_inclusion(LEAVES[2], 0, 0, [], EMPTY_ROOT)
    assert not verify_inclusion(LEAVES[2], 2, 5, [proof[0][:31], *proof[1:]], root)


def test_inclusion_size_trusted_with_root():
    # The size only fixes the path shape, and for leaf 0 a 3-leaf path has the same shape as a 4-leaf path.
    proof = reference_path(0, RECORDS[:3])
    root = reference_mth(RECORDS[:3])
    assert verify_inclusion(LEAVES[0], 0, 4, proof, root)
    assert not verify_inclusion(LEAVES[0], 0, 4, proof, reference_mth(RECORDS[:4]))


# Consistency proofs


def test_consistency_proof_matches_reference():
    for new_size in range(1, MAX_PROOF_SIZE + 1):
        table = NodeTable(new_size)
        new_root = reference_mth(RECORDS[:new_size])
        for old_size in range(1, new_size + 1):
            old_root = reference_mth(RECORDS[:old_size])
            proof = consistency_proof(old_size, new_size, table, tree_size=new_size)
            case = f"old_size {old_size}, new_size {new_size}"
            assert proof == reference_proof(old_size, RECORDS[:new_size]), case
            assert verify_consistency(old_size, new_size, old_root, new_root, proof), case


def test_consistency_proof_empty_for_equal_sizes():
    table = NodeTable(6)
    root = reference_mth(RECORDS[:6])
    assert consistency_proof(6, 6, table) == []
    assert verify_consistency(6, 6, root, root, [])
    assert not verify_consistency(6, 6, root, flip_byte(root), [])
    assert not verify_consistency(6, 6, root, root, [root])


def test_consistency_proof_lookups_logarithmic():
    for new_size in range(1, MAX_SIZE + 1):
        for old_size in range(1, new_size + 1):
            table = NodeTable(new_size)
            consistency_proof(old_size, new_size, table)
            assert table.lookups <= 2 * new_size.bit_length() + 1, f"old_size {old_size}, new_size {new_size}"


def test_consistency_proof_rejects_invalid_sizes():
    table = NodeTable(8)
    with pytest.raises(ValueError, match=r"^old_size 0 is out of range for new_size 5: expected 1 <= old_size <= 5$"):
        consistency_proof(0, 5, table)
    with pytest.raises(ValueError, match=r"^old_size 6 is out of range for new_size 5: expected 1 <= old_size <= 5$"):
        consistency_proof(6, 5, table)
    with pytest.raises(ValueError, match=r"^new_size 0 is out of range: expected new_size >= 1$"):
        consistency_proof(0, 0, table)
    with pytest.raises(
        ValueError, match=r"^new_size 9 is beyond the tree of 8 leaves: expected 1 <= new_size <= 8$"
    ):
        consistency_proof(3, 9, table, tree_size=8)


def test_consistency_tampered_proof_rejected():
    for new_size in range(2, 21):
        new_root = reference_mth(RECORDS[:new_size])
        for old_size in range(1, new_size):
            old_root = reference_mth(RECORDS[:old_size])
            proof = reference_proof(old_size, RECORDS[:new_size])
            case = f"old_size {old_size}, new_size {new_size}"

            for position in range(len(proof)):
                flipped = proof[:position] + [flip_byte(proof[position])] + proof[position + 1 :]
                assert not verify_consistency(old_size, new_size, old_root, new_root, flipped), (
                    f"{case}, flipped {position}"
                )
                dropped = proof[:position] + proof[position + 1 :]
                assert not verify_consistency(old_size, new_size, old_root, new_root, dropped), (
                    f"{case}, dropped {position}"
                )
            assert not verify_consistency(old_size, new_size, old_root, new_root, proof + [LEAVES[0]]), (
                f"{case}, extra hash"
            )
            assert not verify_consistency(old_size, new_size, flip_byte(old_root), new_root, proof), (
                f"{case}, wrong old root"
            )
            assert not verify_consistency(old_size, new_size, old_root, flip_byte(new_root), proof), (
                f"{case}, wrong new root"
            )
            assert not verify_consistency(new_size, old_size, new_root, old_root, proof), f"{case}, swapped"

            for other_old in range(1, new_size + 1):
                if other_old != old_size:
                    other_root = reference_mth(RECORDS[:other_old])
                    assert not verify_consistency(other_old, new_size, other_root, new_root, proof), (
                        f"{case}, as old_size {other_old}"
                    )
            for other_new in range(old_size, 25):
                if other_new != new_size:
                    other_root = reference_mth(RECORDS[:other_new])
                    assert not verify_consistency(old_size, other_new, old_root, other_root, proof), (
                        f"{case}, as new_size {other_new}"
                    )


def test_consistency_out_of_range_rejected():
    old_root = reference_mth(RECORDS[:3])
    new_root = reference_mth(RECORDS[:7])
    proof = reference_proof(3, RECORDS[:7])
    assert not verify_consistency(0, 7, EMPTY_ROOT, new_root, proof)
    assert not verify_consistency(3, 7, old_root, new_root, [])
    assert not verify_consistency(3, 7, old_root, new_root, [proof[0][:31], *proof[1:]])
