"""TAP output shared by the Python tests (tests/runner.py counts the ok / not ok lines)."""
import sys


class Tap:
    def __init__(self):
        self.n = self.failed = 0

    def __call__(self, ok, name, diag=()):
        """One test line; diag lines follow as '# ' comments."""
        self.n += 1
        self.failed += not ok
        print(f"{'ok' if ok else 'not ok'} {self.n} - {name}")
        for line in diag:
            for sub in str(line).splitlines() or [""]:
                print(f"# {sub}")
        sys.stdout.flush()
        return ok

    def skip(self, name, why):
        self.n += 1
        print(f"ok {self.n} - {name} # SKIP {why}")

    def finish(self):
        """The plan line; returns the exit status."""
        print(f"1..{self.n}")
        return 1 if self.failed else 0
