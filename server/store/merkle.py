"""Merkle tree hashing, proofs and proof verification as in RFC 6962 and RFC 9162.

The tree uses SHA-256 with the RFC 6962 domain separation: a leaf hash is
SHA-256(0x00 || data) and an interior node is SHA-256(0x01 || left || right).
MTH(D[n]) for n > 1 splits the leaves at k, the largest power of two smaller
than n. In this module a *leaf* always means a leaf hash, that is
``leaf_hash(record_hash)``, never the record hash itself.

The store keeps every *perfect* subtree, so no function here needs all leaves
in memory. Node (level, index) is the MTH of the 2**level leaves that start at
leaf ``index * 2**level``, and level 0 contains the leaf hashes. Callers pass a
``NodeLookup`` that returns such a node. The proof functions read only nodes
inside the tree size they are given.

The two ``verify_*`` functions take only a proof, sizes and roots, so an
auditor can run them without access to the store.
"""

import hashlib
from collections.abc import Callable, Iterable
from typing import TypeAlias

HASH_SIZE = 32  # bytes in a SHA-256 digest

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"

# MTH of the empty list: SHA-256 of no bytes at all (RFC 6962 section 2.1).
EMPTY_ROOT = hashlib.sha256(b"").digest()

NodeLookup: TypeAlias = Callable[[int, int], bytes]
"""``get_node(level, index)``: the stored hash of perfect node (level, index).

It covers leaves ``[index * 2**level, (index + 1) * 2**level)``, and level 0
is the leaf hash at ``index``. A lookup of a node that is not stored should
raise (for example ``KeyError``). The functions here let that error propagate.
"""


def leaf_hash(data: bytes) -> bytes:
    """Hash leaf data (here a 32-byte record hash) into a level-0 node."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash two child nodes into their parent interior node."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


# Building the tree


def nodes_completed_by(index: int, leaf: bytes, get_node: NodeLookup) -> list[tuple[int, int, bytes]]:
    """Compute the perfect nodes that appending ``leaf`` at position ``index`` completes.

    Returns ``(level, index, hash)`` for each completed node of level 1 or
    more, lowest level first. The leaf itself is not in the list. The store
    should insert these nodes in the same transaction as the leaf. Each node's
    left sibling is read with ``get_node`` and must already be stored. An
    append completes one node per trailing 1 bit of ``index``, which averages
    to about one node per append.
    """
    if index < 0:
        raise ValueError(f"leaf index {index} is invalid: expected index >= 0")
    _check_hash_size(leaf, "leaf")

    completed = []
    level, position, subtree = 0, index, leaf
    # An odd position is a right child, so its parent is now complete.
    while position % 2 == 1:
        subtree = node_hash(get_node(level, position - 1), subtree)
        level, position = level + 1, position // 2
        completed.append((level, position, subtree))
    return completed


def root_from_leaves(leaves: Iterable[bytes]) -> bytes:
    """Compute the root of the tree whose leaf hashes ``leaves`` yields in order.

    Keeps one stack of perfect subtree roots, at most one per level, so memory
    stays O(log n) for n leaves. Returns ``EMPTY_ROOT`` when ``leaves`` is
    empty. Raises ``ValueError`` for a leaf that is not ``HASH_SIZE`` bytes.
    """
    stack: list[tuple[int, bytes]] = []  # (level, hash), levels strictly decreasing
    for position, leaf in enumerate(leaves):
        _check_hash_size(leaf, f"leaf {position}")
        level, subtree = 0, leaf
        while stack and stack[-1][0] == level:
            subtree = node_hash(stack.pop()[1], subtree)
            level += 1
        stack.append((level, subtree))

    if not stack:
        return EMPTY_ROOT
    # The leftover perfect subtrees shrink left to right, and MTH joins them right first.
    root = stack[-1][1]
    for _, subtree in reversed(stack[:-1]):
        root = node_hash(subtree, root)
    return root


# Reading roots and proofs from stored nodes


def subtree_hash(start: int, end: int, get_node: NodeLookup, *, tree_size: int | None = None) -> bytes:
    """Compute MTH of the leaves ``[start, end)`` from stored perfect nodes.

    When ``start`` is a multiple of the smallest power of two that is at least
    ``end - start``, as for every range in the RFC 6962 recursion from leaf 0,
    this makes O(log n) lookups. Other ranges have no perfect nodes on their
    split points and may need up to ``end - start`` lookups. ``tree_size``,
    when given, is the number of leaves in the store, and a larger ``end``
    raises ``ValueError``.
    """
    _check_size("end", end, 1, tree_size)
    if not 0 <= start < end:
        raise ValueError(f"leaf range [{start}, {end}) is invalid: expected 0 <= start < end")
    return _subtree_hash(start, end, get_node)


def root_hash(size: int, get_node: NodeLookup, *, tree_size: int | None = None) -> bytes:
    """Compute the root of the first ``size`` leaves, ``EMPTY_ROOT`` for size 0.

    ``tree_size``, when given, is the number of leaves in the store, and a
    larger ``size`` raises ``ValueError``.
    """
    _check_size("size", size, 0, tree_size)
    if size == 0:
        return EMPTY_ROOT
    return _subtree_hash(0, size, get_node)


def inclusion_proof(index: int, size: int, get_node: NodeLookup, *, tree_size: int | None = None) -> list[bytes]:
    """Build the RFC 6962 audit path PATH(index, D[size]) for the leaf at ``index``.

    The path lists sibling subtree hashes from the leaf up to the root.
    ``tree_size``, when given, is the number of leaves in the store, and a
    larger ``size`` raises ``ValueError``.
    """
    _check_size("size", size, 1, tree_size)
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is out of range for a tree of size {size}: expected 0 <= index < {size}")

    # Walk down from the root and collect each sibling, which gives the path top first.
    path = []
    start, end = 0, size
    while end - start > 1:
        split = start + _split_width(end - start)
        if index < split:
            path.append(_subtree_hash(split, end, get_node))
            end = split
        else:
            path.append(_subtree_hash(start, split, get_node))
            start = split
    path.reverse()
    return path


def consistency_proof(
    old_size: int, new_size: int, get_node: NodeLookup, *, tree_size: int | None = None
) -> list[bytes]:
    """Build the RFC 6962 consistency proof PROOF(old_size, D[new_size]).

    The proof is empty when both sizes are equal. ``tree_size``, when given,
    is the number of leaves in the store, and a larger ``new_size`` raises
    ``ValueError``.
    """
    _check_size("new_size", new_size, 1, tree_size)
    if not 1 <= old_size <= new_size:
        raise ValueError(
            f"old_size {old_size} is out of range for new_size {new_size}: expected 1 <= old_size <= {new_size}"
        )

    # SUBPROOF(m, D[start:end], b), unrolled, where old_size - start is m and
    # b is (start == 0). Each step appends one hash, so the list comes out
    # root first and is reversed at the end.
    proof = []
    start, end = 0, new_size
    while old_size < end:
        split = start + _split_width(end - start)
        if old_size <= split:
            proof.append(_subtree_hash(split, end, get_node))
            end = split
        else:
            proof.append(_subtree_hash(start, split, get_node))
            start = split
    if start > 0:
        # D[start:end] is now the last perfect subtree of the old tree. With
        # start at 0 it would be the whole old tree, whose root the verifier has.
        proof.append(_subtree_hash(start, end, get_node))
    proof.reverse()
    return proof


# Verifying proofs without the store


def verify_inclusion(leaf: bytes, index: int, size: int, proof: list[bytes], root: bytes) -> bool:
    """Check that ``proof`` puts ``leaf`` at ``index`` in the tree of ``size`` leaves with ``root``.

    Follows the verification steps of RFC 9162 section 2.1.3.2. Returns False,
    without raising, for any proof that does not match, including one of the
    wrong length or with an entry that is not ``HASH_SIZE`` bytes.

    NOTE: ``size`` only fixes the shape of the path, so ``size`` and ``root``
    must come from one trusted tree head. A proof can also pass for another
    size whose path has the same shape, when checked against the same root.
    """
    if not 0 <= index < size or not _all_hash_size(proof):
        return False

    node_index, last_index = index, size - 1
    computed = leaf
    for sibling in proof:
        if last_index == 0:
            return False  # the proof is longer than the path to the root
        if node_index % 2 == 1 or node_index == last_index:
            computed = node_hash(sibling, computed)
            # A last node with no right sibling moves up the tree unchanged.
            while node_index % 2 == 0 and node_index != 0:
                node_index, last_index = node_index >> 1, last_index >> 1
        else:
            computed = node_hash(computed, sibling)
        node_index, last_index = node_index >> 1, last_index >> 1
    return last_index == 0 and computed == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: list[bytes]) -> bool:
    """Check that the tree of ``old_size`` leaves with ``old_root`` is a prefix of the tree with ``new_root``.

    Follows the verification steps of RFC 9162 section 2.1.4.2 for
    ``old_size < new_size``. Equal sizes need an empty proof and equal roots.
    Returns False, without raising, for any proof that does not match,
    including one of the wrong length or with an entry that is not
    ``HASH_SIZE`` bytes, and for ``old_size`` outside ``1..new_size``.

    NOTE: the sizes only fix the shape of the proof, so each size must come
    from the same trusted tree head as its root. A proof can also pass for
    other sizes whose proofs have the same shape, when checked against the
    same two roots.
    """
    if not 1 <= old_size <= new_size or not _all_hash_size(proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof:
        return False

    # When the old tree is a perfect subtree of the new one, the proof leaves its root out.
    path = [old_root, *proof] if old_size & (old_size - 1) == 0 else list(proof)
    node_index, last_index = old_size - 1, new_size - 1
    while node_index % 2 == 1:
        node_index, last_index = node_index >> 1, last_index >> 1

    old_computed = new_computed = path[0]
    for sibling in path[1:]:
        if last_index == 0:
            return False  # the proof is longer than the path to the new root
        if node_index % 2 == 1 or node_index == last_index:
            old_computed = node_hash(sibling, old_computed)
            new_computed = node_hash(sibling, new_computed)
            while node_index % 2 == 0 and node_index != 0:
                node_index, last_index = node_index >> 1, last_index >> 1
        else:
            # Right siblings lie past the old tree, so only the new root includes them.
            new_computed = node_hash(new_computed, sibling)
        node_index, last_index = node_index >> 1, last_index >> 1
    return last_index == 0 and old_computed == old_root and new_computed == new_root


# Helpers


def _split_width(width: int) -> int:
    """Return k, the largest power of two smaller than ``width`` (``width`` >= 2)."""
    return 1 << ((width - 1).bit_length() - 1)


def _subtree_hash(start: int, end: int, get_node: NodeLookup) -> bytes:
    width = end - start
    if width & (width - 1) == 0 and start % width == 0:
        level = width.bit_length() - 1
        return get_node(level, start >> level)

    split = start + _split_width(width)
    return node_hash(_subtree_hash(start, split, get_node), _subtree_hash(split, end, get_node))


def _check_size(name: str, size: int, minimum: int, tree_size: int | None) -> None:
    if size < minimum:
        raise ValueError(f"{name} {size} is out of range: expected {name} >= {minimum}")
    if tree_size is not None and size > tree_size:
        raise ValueError(
            f"{name} {size} is beyond the tree of {tree_size} leaves: expected {minimum} <= {name} <= {tree_size}"
        )


def _check_hash_size(value: bytes, name: str) -> None:
    if len(value) != HASH_SIZE:
        raise ValueError(f"{name} is {len(value)} bytes: expected a {HASH_SIZE}-byte SHA-256 hash")


def _all_hash_size(hashes: list[bytes]) -> bool:
    return all(len(value) == HASH_SIZE for value in hashes)
