"""Exit 1 if a config of a `w4a16 sass --json` build (argv[2]) spills beyond what the rules of the
baseline build's Triton release (argv[1]) accept (`w4a16.sass.allowances`: the spills a shipped
config has on every release), naming each one: a newer release's own spill allowances do not
count here."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from w4a16.backends.triton_compat import release  # noqa: E402
from w4a16.sass.allowances import allowance_for  # noqa: E402

base, new = (json.load(open(p)) for p in sys.argv[1:3])
rel = release(base["triton"])
bad = []
for key, c in new["cases"].items():
    spills = c.get("spills") or 0
    if not spills:
        continue
    rule = allowance_for(rel, c["kernel"], c["label"])
    inside = c.get("loop_spills") or 0
    if not (rule and spills <= rule.spills and (rule.loop_spills is None or inside <= rule.loop_spills)):
        bad.append(f"{key}: {spills} spill instructions ({inside} in the main loop)")
for line in bad:
    print(line)
sys.exit(1 if bad else 0)
