"""The one thread a server's torch work runs on: calls in order, results and exceptions
handed back, and `fgpt serve` loading its weights there, not on the main thread."""

import threading

import pytest

from functional_gpt import GPTConfig, init_params, save_params
from functional_gpt.errors import UserError
from functional_gpt.generation import server as server_module
from functional_gpt.generation.compute_thread import ComputeThread


def test_calls_run_in_order_on_the_thread_and_hand_back_results_and_exceptions():
    thread, seen = ComputeThread("t"), []
    thread.start()
    first = thread.submit(lambda: seen.append(threading.current_thread().name) or 1)
    assert thread.call(lambda: seen.append("second") or 2) == 2 and first.result() == 1
    assert seen == ["t", "second"] and thread.daemon
    with pytest.raises(UserError, match="bad"):
        thread.call(lambda: (_ for _ in ()).throw(UserError("bad")))
    thread.stop(timeout=5)
    assert not thread.is_alive()


def test_serve_loads_the_weights_and_builds_the_engine_on_the_engines_thread(tmp_path, monkeypatch):
    tiny = GPTConfig(vocab_size=50257, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    save_params(tmp_path / "w.safetensors", init_params(tiny, seed=0), tiny)
    where = {}
    from functional_gpt.model import checkpoint

    real_load = checkpoint.load_params

    def load(*a, **k):
        where["load"] = threading.current_thread().name
        return real_load(*a, **k)

    monkeypatch.setattr(checkpoint, "load_params", load)
    monkeypatch.setattr(server_module, "Engine", lambda *a, **k: where.update(engine=threading.current_thread().name))

    class Listened(Exception):
        pass

    def listen(host, port):
        raise Listened

    monkeypatch.setattr(server_module, "_listen", listen)
    with pytest.raises(Listened):
        server_module.serve(str(tmp_path / "w.safetensors"))
    assert where == {"load": "fgpt-engine", "engine": "fgpt-engine"}
