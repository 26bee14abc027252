"""Test helpers for the judge: a judge whose answers are known (:class:`ScriptedBackend`) and a judge answer in the
official JSON layout (:func:`answer`). Used by test_judge.py, test_bench.py and test_dpo.py."""

from __future__ import annotations

import json
import threading

from lwlib.backends import Generation
from lwlib.judge import JUDGE_DIMENSIONS as DIMS


def answer(scores, analysis="Fine.", fenced=False, trailing=""):
    """A judge answer with ``scores`` for the six dimensions (in order), optionally fenced as ```json."""
    obj = {"Analysis": analysis, **dict(zip(DIMS, scores))}
    body = json.dumps(obj, indent=2)
    return (f"```json\n{body}\n```" if fenced else body) + trailing


class ScriptedBackend:
    """Answers with the given texts in turn (the last one repeats): a judge whose output is known.
    An answer that is an ``Exception`` instance comes back as a transport error."""

    def __init__(self, answers, name="scripted-judge"):
        self.answers = list(answers)
        self.name = name
        self.calls = 0
        self._lock = threading.Lock()

    def _next(self):
        with self._lock:
            a = self.answers[min(self.calls, len(self.answers) - 1)]
            self.calls += 1
            return a

    def generate_iter(self, prompts, params, max_new_tokens=None, desc=None):
        for i, _ in enumerate(prompts):
            a = self._next()
            if isinstance(a, Exception):
                yield i, Generation("", 10, 0, "error", error=str(a))
            else:
                yield i, Generation(a, 10, 10, "stop")

    def generate(self, prompts, params, max_new_tokens=None, desc=None):
        return [g for _, g in self.generate_iter(prompts, params)]
