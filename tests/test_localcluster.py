"""The private-cluster helpers shared by `make bench-nodes` and the multi-node tests."""

from __future__ import annotations

import os
import socket

from lumbar_ray.bench.localcluster import ENV_PORTS, free_ports, is_port_free, node_args, private_ray_tmpdir, port_window


def test_free_ports_are_distinct_free_and_below_the_ephemeral_range():
    ports, window = free_ports(6, span=8)
    lo, hi = port_window()
    assert len(set(ports)) == 6 and all(lo <= p < hi and is_port_free(p) for p in ports)
    assert window[1] - window[0] == 7 and not set(ports) & set(range(window[0], window[1] + 1))
    with socket.socket() as s:  # a port in use is not free
        s.bind(("127.0.0.1", ports[0]))
        s.listen()
        assert not is_port_free(ports[0])


def test_private_ray_tmpdir_sets_and_restores_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "somebody-else:6379")
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    with private_ray_tmpdir(prefix="lr-test-") as temp_dir:
        assert os.environ["RAY_TMPDIR"] == temp_dir and temp_dir.startswith("/tmp/lr-test-")
        assert "RAY_ADDRESS" not in os.environ  # a bare ray.init() must not join anyone's cluster
        assert all(os.environ[name].isdigit() for name in ENV_PORTS)
        head = node_args(temp_dir, 1, head=True, object_store_mb=300)
        worker = node_args(temp_dir, 2, head=False, resources={"x": 1})
    os.rmdir(temp_dir)
    assert "RAY_TMPDIR" not in os.environ and os.environ["RAY_ADDRESS"] == "somebody-else:6379"
    head_ports = [v for k, v in head.items() if k.endswith("_port")]
    assert len(head_ports) == 8 and len(set(head_ports)) == 8 and "gcs_server_port" not in worker
    assert head["temp_dir"] == os.path.join(temp_dir, "ray") and head["object_store_memory"] == 300 * 2**20
    assert worker["num_cpus"] == 2 and worker["resources"] == {"x": 1} and worker["num_gpus"] == 0
