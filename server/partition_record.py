"""Saves and prints the data partition, recomputed from the seed on the server.

Every node derives its shard from (dataset labels, partition scheme, seed, number of
partitions); the server repeats that computation from the labels alone to record it.
The number of partitions is what the clients report (it is node configuration).
"""

from __future__ import annotations

import logging

from common.config import RunConfig
from common.data.federated import partition_for
from server.run_dir import RunDirectory
from server.strategies import SharedFedAvg

log = logging.getLogger(__name__)


class PartitionRecorder:
    def __init__(self, cfg: RunConfig, strategy: SharedFedAvg, run_dir: RunDirectory) -> None:
        self.cfg, self.strategy, self.run_dir = cfg, strategy, run_dir
        self.done = False

    def maybe_record(self, server_round: int) -> None:
        if self.done or server_round < 1 or (self.run_dir.path / "partition.json").exists():
            return
        reported = self.strategy.stats(server_round).num_partitions
        if len(reported) != 1:
            if len(reported) > 1:
                log.warning("clients disagree on num-partitions: %s; partition not recorded", sorted(reported))
                self.done = True
            return
        self.done = True
        try:
            partition = partition_for(self.cfg, reported.pop())
        except (OSError, ValueError) as err:  # e.g. the server has no copy of data-dir
            log.warning("partition not recorded on the server: %s", err)
            return
        self.run_dir.write_partition(partition.to_json())
        print(f"[pfedmma] partition ({partition.scheme}, seed {partition.seed}):\n{partition.table()}", flush=True)
