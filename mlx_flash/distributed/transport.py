"""Moving shards between ranks, on MLX's own collectives (no transport of ours).

`Ring` passes one array per step to the right neighbour and receives one
from the left (`mx.distributed.send` / `recv`), on a stream of its own so
that a transfer can run while the compute stream runs attention. Backends
with send/recv: ring (TCP), jaccl, mpi.

`Gather` is for backends without send/recv (MLX's `nccl` backend raises on
both): every shard is all-gathered up front and gradients come home with one
reduce-scatter (`sum_scatter`, NCCL only; elsewhere `all_sum` and a slice,
W times the traffic, kept for testing this path on CPU).

Ordering. Messages between two ranks are matched by order only, so every
rank must run its exchanges in the same order. Each transfer is one message
(K and V packed together), and all exchanges of a process on a group form
one chain, in the order the Python code issues them (forward calls, then
the backward calls in the order the autodiff runs them, which is the same
on every rank): a send's input depends on the previous exchange's result
(or a one-element token left by the previous call), and each exchange's
result depends on both its send and its recv. MLX runs the ops of one
stream in the order of its eval tape, a reverse topological order in which
an array comes only after everything its consumers need; a recv's only
consumer is its exchange's result, so it cannot run before the exchange
the chain puts ahead of it. Within an exchange even ranks send first and
odd ranks receive first; both sending first deadlocks a 2-rank ring once a
message outgrows the socket buffers.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from .. import dispatch


@functools.lru_cache(maxsize=None)
def comm_stream(device_type):
    """One stream per process for transfers, apart from the compute stream."""
    return mx.new_stream(mx.Device(device_type))


def pack(*arrays):
    """Flatten and join arrays of one dtype into one message."""
    return mx.concatenate([a.reshape(-1) for a in arrays])


def unpack(flat, shapes):
    out, start = [], 0
    for shape in shapes:
        size = 1
        for d in shape:
            size *= d
        out.append(flat[start:start + size].reshape(shape))
        start += size
    return out


_chain = {}  # id(group) -> token of the last exchange issued on it


def _token_after(group, results):
    """Make `results` the end of group's chain: a one-element token waits on them,
    and they wait on the token so that evaluating them evaluates it (and frees
    what it holds)."""
    token = mx.depends([mx.zeros((1,), mx.float32)], list(results))[0]
    _chain[id(group)] = token
    return mx.depends(list(results), [token])


def in_ring_order(collective, *arrays, group=None, **kwargs):
    """Run `collective(*arrays, group=group, **kwargs)` (e.g. mx.distributed.all_sum)
    after every ring transfer issued so far on `group`, and before later ones.

    With the ring backend (and any backend whose collectives share the
    sockets of send/recv), a collective that runs while ring attention's
    transfers are in flight mixes their bytes: a loss's all_sum does not
    depend on the backward's transfers, so MLX may run both at once. Issue
    collectives on the same group through this (shard/unshard already do).
    """
    group = group if group is not None else mx.distributed.init()
    token = _chain.get(id(group))
    if token is not None:
        arrays = mx.depends(list(arrays), [token])
    result = collective(*arrays, group=group, **kwargs)
    many = isinstance(result, (list, tuple))
    done = _token_after(group, list(result) if many else [result])
    return type(result)(done) if many else done[0]


class Ring:
    """Shift arrays one rank to the right around the group, in a fixed order."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.right = (self.rank + 1) % self.size
        self.left = (self.rank - 1) % self.size
        # The ring backend's send/recv always run on a CPU stream.
        self.stream = comm_stream(mx.cpu)
        self.last = _chain.get(id(group))

    def shift(self, x, reverse: bool = False):
        """Send x to the right neighbour; return what the left one sent (mirrored with `reverse`)."""
        if self.last is not None:
            x = mx.depends([x], [self.last])[0]
        kw = dict(group=self.group, stream=self.stream)
        to, source = (self.left, self.right) if reverse else (self.right, self.left)
        if self.rank % 2 == 0:
            sent = mx.distributed.send(x, to, **kw)
            got = mx.distributed.recv(x.shape, x.dtype, source, **kw)
            # Depends(got, sent): the tape runs its inputs last-first, so the send goes first.
            got = mx.depends([got], [sent])[0]
        else:
            # MLX's ring backend polls a socket without sleeping while a recv is
            # pending, so a recv posted before this rank's own message is ready
            # would spin through this rank's attention. A no-op on the transfer
            # stream that waits for x (a sleeping wait) comes first in the stream.
            gate = mx.depends([mx.zeros((1,), mx.float32, stream=self.stream)], [x])[0]
            x = mx.depends([x], [gate])[0]
            got = mx.distributed.recv(x.shape, x.dtype, source, **kw)
            sent = mx.distributed.send(mx.depends([x], [got])[0], to, **kw)
            got = mx.depends([got], [sent])[0]
        self.last = got
        return got

    def close(self, *results):
        """Leave a one-element token for the next call's chain; tie it to `results`.

        The token (not the last message, which would stay in memory) is what
        the next call waits on; making the results depend on it gets it
        evaluated with them.
        """
        if self.last is None:
            return results
        token = mx.depends([mx.zeros((1,), mx.float32)], [self.last])[0]
        _chain[id(self.group)] = token
        return tuple(mx.depends(list(results), [token]))


class Gather:
    """All-gather shards up front; reduce-scatter gradients back."""

    def __init__(self, group, device_type):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.reduce_scatter = device_type == mx.gpu and dispatch.cuda_available()

    def gather(self, x):
        """[W, *x.shape]: every rank's x, by rank."""
        return mx.distributed.all_gather(x[None], group=self.group)

    def sum_home(self, x):
        """x is [W, ...] with row s meant for rank s: the sum over ranks of this rank's row."""
        if self.reduce_scatter:
            return mx.distributed.sum_scatter(x, group=self.group)[0]
        return mx.distributed.all_sum(x, group=self.group)[self.rank]
