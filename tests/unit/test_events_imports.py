"""Building events needs no Cassandra driver: importing the event builders must not load it."""

import subprocess
import sys


def test_importing_events_does_not_import_cassandra():
    code = "import sys, dicomgrid.core.events; print(sorted(m for m in sys.modules if m.split('.')[0] == 'cassandra'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

