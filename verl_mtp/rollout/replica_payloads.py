"""serialized_named_tensors of a colocated tensor sync, one entry per tensor-parallel rank of the replica.

SGLang's scheduler rank r opens entry r only (`serialized_named_tensors[tp_rank]`), on its own GPU. In
colocated server mode the replica's TP rank r runs on the GPU of the r-th actor rank of its group
(rollout_backends.ColocatedServer: the group's devices in rank order), so entry r is built by that actor
rank, from its own gathered tensors, on its own GPU. Per update call (one bucket, sglang.update_buckets):

    every member   encode(bucket) -> (entry, keep-alive)       on its own device
    every member   gather_object((names, entry, error)) to the leader (the rank that talks to the server)
    leader         POST /update_weights_from_tensor with the entries in group-rank (= TP-rank) order
    every member   broadcast_object_list(status) from the leader, once the replica answered; then the
                   member drops its keep-alive (a CUDA IPC handle does not keep the memory alive)

The leader runs this inside `client.push_weights` (`ReplicaPayloads.entries` is the plan's encoder) and
calls `finish` after it, success or not; the other members call `follow`. Every member enters every
collective: a member that fails to encode still joins the gather with its error, and a leader whose sync
fails broadcasts the failure, so no rank is left waiting in a collective. The group is a gloo group (the
payloads are small strings: handles, not data); without one (a replica fed by its leader alone, e.g. our
CPU server, which takes one entry) nothing is collective.
"""

from __future__ import annotations

from typing import Callable

import torch.distributed as dist

from verl_mtp.rollout.replica import ReplicaError

OK = None  # the status broadcast after a replica loaded a bucket


def replica_group(rank: int, world_size: int, tp: int):
    """The gloo group of the `tp` consecutive ranks `rank` belongs to (None when tp == 1). Every rank of the
    default group must call it, at the same point: each subgroup is created collectively."""
    if tp == 1:
        return None
    if world_size % tp:
        raise ValueError(f"{world_size} actor ranks do not split into rollout tensor-parallel groups of {tp}")
    own = None
    for first in range(0, world_size, tp):
        group = dist.new_group(list(range(first, first + tp)), backend="gloo")
        if first <= rank < first + tp:
            own = group
    return own


class ReplicaPayloads:
    """One replica's serialized_named_tensors, built per bucket by every member of its group (see module).

    encode(bucket) -> (entry, keep): this rank's entry, and what must stay alive until the replica has
    answered the update (the tensors the entry's handles point to; None when the entry holds the data).
    group: the torch.distributed group of the replica's actor ranks, the leader at group rank 0; None when
    the leader alone builds the only entry.
    """

    def __init__(self, encode: Callable, group=None):
        self.encode = encode
        self.group = group
        self._keep = None  # the keep-alive of the bucket the replica is loading
        self._pending = False  # leader: a bucket was gathered, its status not yet broadcast
        self._sent = 0  # leader: buckets gathered so far

    # ---- the leader -------------------------------------------------------------------------------

    def entries(self, bucket: list) -> list[str]:
        """serialized_named_tensors for `bucket`: every member's entry, in group-rank order. Called by the
        sync plan right before the bucket's update is sent, so the previous update has been answered."""
        self._keep = None  # the previous bucket was answered: run_plan sends one call at a time
        entry, self._keep = self.encode(bucket)
        if self.group is None:
            return [entry]
        self._broadcast_pending(OK)
        names = [n for n, _ in bucket]
        gathered = [None] * dist.get_world_size(self.group)
        dist.gather_object((names, entry, None), gathered, group_dst=0, group=self.group)
        self._pending, self._sent = True, self._sent + 1
        for member, (their_names, _, error) in enumerate(gathered):
            if error is not None:
                raise ReplicaError(f"colocated sync: actor rank {self._global(member)} could not serialize its "
                                   f"tensors: {error}")
            if their_names != names:
                raise ReplicaError(f"colocated sync: actor rank {self._global(member)} sent bucket "
                                   f"{their_names[:3]}... where the leader sends {names[:3]}...: the ranks "
                                   "gathered different tensors")
        return [e for _, e, _ in gathered]

    def finish(self, buckets: int, error: BaseException | None = None) -> None:
        """After the sync (which sent `buckets` updates, or failed with `error`): release the members."""
        self._keep = None
        if self.group is None:
            return
        message = None if error is None else f"{type(error).__name__}: {error}"
        if self._pending:
            self._broadcast_pending(message)
            if message is not None:
                return  # the members stop at this status
        if self._sent < buckets:  # the members wait in the gather of the next bucket: end it with the failure
            message = message or f"the sync sent {self._sent} of {buckets} buckets"
            dist.gather_object(None, [None] * dist.get_world_size(self.group), group_dst=0, group=self.group)
            self._pending = True
            self._broadcast_pending(message)
            if error is None:
                raise RuntimeError(f"colocated sync: {message}")

    def _broadcast_pending(self, message: str | None) -> None:
        if self._pending:
            dist.broadcast_object_list([message], group_src=0, group=self.group)
            self._pending = False

    def _global(self, member: int) -> int:
        return dist.get_global_rank(self.group, member)

    # ---- the other members ------------------------------------------------------------------------

    def follow(self, buckets: list[list]) -> int:
        """A member that does not talk to the server: build and hand over each bucket's entry, keep its
        tensors until the leader reports the replica loaded it; -> buckets sent. Raises the leader's error."""
        for k, bucket in enumerate(buckets):
            entry, keep, error = None, None, None
            try:
                entry, keep = self.encode(bucket)
            except Exception as e:  # still joins the gather, or the leader would wait for this rank forever
                error = f"{type(e).__name__}: {e}"
            dist.gather_object(([n for n, _ in bucket], entry, error), None, group_dst=0, group=self.group)
            status = [None]
            dist.broadcast_object_list(status, group_src=0, group=self.group)
            del keep
            if error is not None:
                raise ReplicaError(f"colocated sync: this rank could not serialize bucket {k}: {error}")
            if status[0] is not None:
                raise ReplicaError(f"colocated sync: the replica's leader rank {self._global(0)} failed at bucket "
                                   f"{k}: {status[0]}")
        return len(buckets)
