"""Conversions between the shared types and the public API's messages (nanocp.v1), for the router and the SDK alike,
so that neither package imports the other."""

from __future__ import annotations

from nanocp.placement import Placement, Shard
from nanocp.v1 import common_pb2


def placement_to_proto(placement: Placement) -> common_pb2.Placement:
    return common_pb2.Placement(
        home=placement.home,
        shards=[
            common_pb2.Shard(instance=s.instance, start=s.start, page_quota=s.page_quota, rank=s.rank)
            for s in placement.shards
        ],
    )


def placement_from_proto(proto: common_pb2.Placement) -> Placement:
    return Placement(proto.home, [Shard(s.rank, s.start, s.page_quota, s.instance) for s in proto.shards])


def finish_reason_name(reason: common_pb2.FinishReason.ValueType) -> str:
    """FINISH_REASON_STOP -> "stop", the OpenTelemetry GenAI spelling."""
    return common_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()
