"""A real local cluster without Docker: Kafka (KRaft) and Cassandra as JVM processes from Maven jars."""

from .cluster import ClusterStatus, ComponentStatus, LocalCluster
from .errors import InfraError

__all__ = ["ClusterStatus", "ComponentStatus", "InfraError", "LocalCluster"]
