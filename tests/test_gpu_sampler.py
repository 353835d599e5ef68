"""The GPU sampler (producers/gpu.py): NVML path (with a stand-in pynvml), rank mapping, replay of JSON lines and
nvidia-smi CSV, pacing, and the publisher's bounded buffer while the broker is away."""

from __future__ import annotations

import sys
import threading
import types

import pytest
from kafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry
from rankwatch.producers.gpu import (
    GpuPublisher,
    GpuSampler,
    GpuSamplerConfig,
    NvmlUnavailable,
    SamplerMetrics,
    load_rank_map,
    nvml_sample_fn,
)
from rankwatch.producers.gpu_replay import paced, read_samples

from rankwatch.config import Settings
from rankwatch.parsing import ParseError
from rankwatch.records import Record, decode_record, encode_record

MIB = 2**20


def fake_pynvml(count: int = 2, fail_init: bool = False) -> types.ModuleType:
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    m.NVMLError = NVMLError
    m.NVML_TEMPERATURE_GPU = 0

    def init():
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    m.nvmlInit = init
    m.nvmlDeviceGetCount = lambda: count
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(10 + h) * 2**30, total=80 * 2**30)
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=90 + h)
    m.nvmlDeviceGetTemperature = lambda h, kind: 60

    def power(h):
        if h == 1:
            raise NVMLError("Not Supported")  # a GPU without power readings: the field is left out
        return 412_000

    m.nvmlDeviceGetPowerUsage = power
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [types.SimpleNamespace(usedGpuMemory=5 * 2**30),
                                                         types.SimpleNamespace(usedGpuMemory=None)]
    return m


def test_nvml_path_reads_memory_util_temperature_power_and_process_memory(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    rows = nvml_sample_fn()()
    assert rows[0] == {"gpu": 0, "mem_used_bytes": 10 * 2**30, "mem_total_bytes": 80 * 2**30, "util_pct": 90.0,
                       "temp_c": 60.0, "power_w": 412.0, "proc_used_bytes": 5 * 2**30}
    assert "power_w" not in rows[1] and rows[1]["mem_used_bytes"] == 11 * 2**30
    assert [r["gpu"] for r in nvml_sample_fn([1])()] == [1]
    with pytest.raises(NvmlUnavailable, match="index"):
        nvml_sample_fn([5])
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_init=True))
    with pytest.raises(NvmlUnavailable, match="Library Not Found"):
        nvml_sample_fn()
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(count=0))
    with pytest.raises(NvmlUnavailable, match="no NVIDIA GPU"):
        nvml_sample_fn()


def test_sampler_records_are_gpu_samples_keyed_job_host_gpu_with_ranks():
    rows = [{"gpu": 0, "mem_used_bytes": 1.0, "mem_total_bytes": 2.0}, {"gpu": 1, "mem_used_bytes": 1.5,
                                                                         "mem_total_bytes": 2.0}]
    s = GpuSampler(lambda: rows, "llama", "node9", {1: 17}, clock=lambda: 123.0)
    recs = s.sample()
    assert [(r.kind, r.key(), r.rank, r.ts) for r in recs] == [("gpu", "llama/node9/0", None, 123.0),
                                                             ("gpu", "llama/node9/1", 17, 123.0)]
    assert decode_record(encode_record(recs[1])) == recs[1]
    broken = GpuSampler(lambda: (_ for _ in ()).throw(RuntimeError("GPU fell off the bus")), "j", "h")
    assert broken.sample() == [] and broken.errors == 1  # counted and logged; sampling goes on


def test_rank_map_from_file_and_from_the_launcher_environment(tmp_path):
    f = tmp_path / "map.json"
    f.write_text('{"0": 8, "1": 9}')
    assert load_rank_map(str(f)) == {0: 8, 1: 9}
    f.write_text("# gpu rank\n0 16\n1, 17\n")
    assert load_rank_map(str(f)) == {0: 16, 1: 17}
    assert load_rank_map(None, {"RANK": "13", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,6"}) == {6: 13}
    assert load_rank_map(None, {"NODE_RANK": "2", "LOCAL_WORLD_SIZE": "4"}) == {0: 8, 1: 9, 2: 10, 3: 11}
    assert load_rank_map(None, {}) == {}


def test_replay_reads_gpu_json_lines_and_skips_other_lines(tmp_path):
    f = tmp_path / "gpu.jsonl"
    f.write_text('{"ts": 10.0, "host": "a", "gpu": 0, "rank": 3, "mem_used_bytes": 5, "mem_total_bytes": 10}\n'
                 '{"step": 1, "loss": 2.0}\n'
                 "not json at all\n"
                 '{"ts": 11.0, "host": "a", "gpu": 1, "mem_used_bytes": 6, "mem_total_bytes": 10, "num_ooms": 1}\n')
    recs = list(read_samples(str(f), "job", ranks={1: 4}))
    assert [(r.data["gpu"], r.rank, r.ts) for r in recs] == [(0, 3, 10.0), (1, 4, 11.0)]
    assert recs[1].data["num_ooms"] == 1.0 and recs[0].offset == 0 and recs[1].offset > 0


def test_replay_reads_nvidia_smi_csv_with_units_repeated_headers_and_missing_values(tmp_path):
    f = tmp_path / "smi.csv"
    f.write_text("timestamp, index, memory.used [MiB], memory.total [MiB], utilization.gpu [%], power.draw [W]\n"
                 "2026/10/01 10:00:00.000, 0, 54022 MiB, 81559 MiB, 100 %, 401.30 W\n"
                 "2026/10/01 10:00:00.000, 1, 1024 MiB, 81559 MiB, 0 %, [N/A]\n"
                 "timestamp, index, memory.used [MiB], memory.total [MiB], utilization.gpu [%], power.draw [W]\n"
                 "2026/10/01 10:00:01.500, 0, 55000 MiB, 81559 MiB, 99 %, 399.00 W\n")
    recs = list(read_samples(str(f), "job", host="node4"))
    assert [(r.data["gpu"], r.data["mem_used_bytes"]) for r in recs] == [(0, 54022 * MIB), (1, 1024 * MIB),
                                                                      (0, 55000 * MIB)]
    assert recs[0].data["mem_total_bytes"] == 81559 * MIB and recs[0].data["util_pct"] == 100.0
    assert recs[0].data["power_w"] == pytest.approx(401.3) and "power_w" not in recs[1].data
    assert recs[2].ts - recs[0].ts == pytest.approx(1.5) and recs[0].data["host"] == "node4"
    nounits = tmp_path / "nounits.csv"
    nounits.write_text("index, memory.used [MiB], memory.total [MiB]\n0, 100, 200\n")
    (rec,) = read_samples(str(nounits), "job", host="h")
    assert rec.data["mem_used_bytes"] == 100 * MIB
    noheader = tmp_path / "noheader.csv"
    noheader.write_text("2026/10/01 10:00:00.000, 0, 54022 MiB, 81559 MiB\n")
    with pytest.raises(ParseError, match="header"):
        list(read_samples(str(noheader), "job", host="h"))


def test_paced_replay_keeps_the_recorded_pace_scaled_by_speed():
    recs = [Record("gpu", "j", None, 100.0 + 2 * i, "", -1, {}) for i in range(4)]
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(round(s, 6))
        now[0] += s

    assert len(list(paced(recs, 4.0, sleep=sleep, clock=lambda: now[0]))) == 4
    assert slept == [0.5, 0.5, 0.5]  # 2 s apart at 4x
    slept.clear()
    list(paced(recs, 0, sleep=sleep, clock=lambda: now[0]))
    assert slept == []


class FakeFuture:
    def __init__(self, fail: bool = False) -> None:
        self._fail = fail

    def failed(self) -> bool:
        return self._fail


class FakeProducer:
    """Acknowledges, or (while `down` is set) times out flushes like kafka-python with the broker away."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.pending: list[tuple[str, bytes, bytes]] = []
        self.fail_next = 0

    def send(self, topic, key, value):
        self.pending.append((topic, key, value))
        fail = self.fail_next > 0
        self.fail_next -= fail
        if fail:
            self.pending.pop()
        return FakeFuture(fail)

    def flush(self, timeout=None):
        if self.down.is_set():
            threading.Event().wait(min(timeout or 0.05, 0.05))
            raise KafkaTimeoutError("flush timed out")
        self.sent.extend(self.pending)
        self.pending.clear()

    def close(self, timeout=None):
        pass


def _records(n: int, start: int = 0) -> list[Record]:
    return [Record("gpu", "j", None, float(start + i), "", -1,
                   {"host": "h", "gpu": 0, "mem_used_bytes": float(start + i), "mem_total_bytes": 1e9})
            for i in range(n)]


def test_publisher_sends_with_keys_and_bounds_its_buffer_while_the_broker_is_away():
    fake = FakeProducer()
    reg = CollectorRegistry()
    cfg = GpuSamplerConfig(buffer_samples=50, send_batch=10, stall_report_s=0.05)
    pub = GpuPublisher(Settings(bootstrap="x:1"), cfg, SamplerMetrics(reg), producer_factory=lambda: fake).start()
    pub.offer(_records(20))
    _wait(lambda: len(fake.sent) == 20)
    assert fake.sent[0][0] == "rankwatch.gpu" and fake.sent[0][1] == b"j/h/0"
    assert decode_record(fake.sent[19][2]).data["mem_used_bytes"] == 19.0
    fake.down.set()  # broker away: sampling goes on into the buffer, the oldest are dropped past 50
    pub.offer(_records(10, 20))  # this batch is taken by the sender and waits for acks
    _wait(lambda: len(fake.pending) == 10)
    pub.offer(_records(80, 30))
    assert pub.dropped == 30 and len(pub.buffer) == 50
    assert reg.get_sample_value("rankwatch_sampler_dropped_samples_total") == 30
    _wait(lambda: reg.get_sample_value("rankwatch_sampler_stalled") == 1)
    fake.down.clear()
    _wait(lambda: len(fake.sent) == 80)
    values = [decode_record(v).data["mem_used_bytes"] for _, _, v in fake.sent]
    assert values == list(range(30)) + list(range(60, 110))  # nothing lost silently: 30 oldest dropped, counted
    fake.fail_next = 3  # failed deliveries are sent again (once each: no loss, no duplicate)
    pub.offer(_records(5, 200))
    _wait(lambda: len(fake.sent) == 85)
    assert sorted(decode_record(v).data["mem_used_bytes"] for _, _, v in fake.sent[-5:]) == [200, 201, 202, 203, 204]
    assert reg.get_sample_value("rankwatch_sampler_send_failures_total") == 3
    pub.close(timeout=5)
    assert reg.get_sample_value("rankwatch_sampler_samples_total") == 115


def _wait(pred, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_producer_gpu_without_nvml_says_so_in_one_line_and_exits_non_zero(monkeypatch, capsys):
    from rankwatch.producers import gpu_cli
    from rankwatch.producers.shipper import main

    def unavailable(devices=None):
        raise NvmlUnavailable("NVML: NVML Shared Library Not Found")

    monkeypatch.setattr(gpu_cli, "nvml_sample_fn", unavailable)
    assert main(["--gpu", "--job", "j", "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read GPUs" in err[0] and "--replay" in err[0]
    assert main(["--job", "j"]) == 2  # neither --tail nor --gpu
    assert main(["--gpu", "--job", "j", "--replay", "/nonexistent.jsonl"]) == 2


def test_live_sampling_loop_publishes_every_gpu_on_schedule_until_stopped(monkeypatch):
    from rankwatch.producers import gpu_cli
    from rankwatch.producers.shipper import build_parser

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(count=2))
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = build_parser().parse_args(["--gpu", "--job", "j", "--interval", "0.05", "--host", "n1"])
    run = gpu_cli.setup_gpu(args, Settings(bootstrap="x:1"), CollectorRegistry())
    fake = FakeProducer()
    run.publisher.factory = lambda: fake
    t = threading.Thread(target=run.run)
    t.start()
    _wait(lambda: len(fake.sent) >= 10)
    run.stop.set()
    t.join(10)
    recs = [decode_record(v) for _, _, v in fake.sent]
    assert {(r.data["host"], r.data["gpu"], r.rank) for r in recs} == {("n1", 0, 2), ("n1", 1, 3)}
    assert all(r.data["mem_total_bytes"] == 80 * 2**30 for r in recs)
    ts = sorted({r.ts for r in recs})
    assert len(ts) >= 5 and min(b - a for a, b in zip(ts, ts[1:], strict=False)) > 0.03  # one sample per interval
    assert run.sampled == len(recs) == run.publisher.sent
