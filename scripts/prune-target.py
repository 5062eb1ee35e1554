#!/usr/bin/env python3
"""Delete build artifacts the current build no longer uses from cargo's target dir.

Usage: cargo <build|test --no-run> --message-format=json ... | scripts/prune-target.py PROFILE_DIR
Reads cargo's JSON messages (every unit is reported, fresh or rebuilt), keeps the artifact hashes
they name, and removes other hashed files and folders under PROFILE_DIR/{deps,build,.fingerprint}.
"""
import json, os, re, shutil, sys

profile = sys.argv[1]
keep = set()
hash_re = re.compile(r"-([0-9a-f]{16})(?:\.|$)")
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    paths = list(m.get("filenames") or [])
    if m.get("executable"):
        paths.append(m["executable"])
    if m.get("out_dir"):
        paths.append(m["out_dir"].rstrip("/").rsplit("/", 1)[0])
    for p in paths:
        for part in p.split("/"):
            h = hash_re.search(part)
            if h:
                keep.add(h.group(1))
if len(keep) < 50:
    sys.exit(f"prune-target: only {len(keep)} artifacts reported; refusing to prune")
freed = 0
for sub in ("deps", "build", ".fingerprint"):
    d = os.path.join(profile, sub)
    if not os.path.isdir(d):
        continue
    for name in os.listdir(d):
        h = hash_re.search(name)
        if not h or h.group(1) in keep:
            continue
        p = os.path.join(d, name)
        if os.path.isdir(p) and not os.path.islink(p):
            for root, _, files in os.walk(p):
                freed += sum(os.path.getsize(os.path.join(root, f)) for f in files if os.path.isfile(os.path.join(root, f)))
            shutil.rmtree(p, ignore_errors=True)
        else:
            freed += os.path.getsize(p)
            os.remove(p)
print(f"prune-target: kept {len(keep)} artifacts, freed {freed / 2**30:.1f} GiB in {profile}", file=sys.stderr)
