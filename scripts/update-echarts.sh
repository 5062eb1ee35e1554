#!/usr/bin/env bash
# Refreshes the dashboard's charting library (Apache ECharts, Apache-2.0), bundled into the cloud
# binary from cloud/assets/ so that the dashboard works offline (no CDN).
#   scripts/update-echarts.sh [VERSION]
# Takes the package from npm (its integrity checked by npm), copies dist/echarts.min.js, LICENSE
# and NOTICE, and prints the version to put in cloud/src/api/live.rs (ECHARTS_VERSION).
set -euo pipefail
version=${1:-6.1.0}
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "echarts@$version" >/dev/null && tar xzf echarts-*.tgz)
cp "$work/package/dist/echarts.min.js" cloud/assets/echarts.min.js
cp "$work/package/LICENSE" cloud/assets/echarts.LICENSE
cp "$work/package/NOTICE" cloud/assets/echarts.NOTICE
sha256sum cloud/assets/echarts.min.js
echo "echarts $version in cloud/assets/; set ECHARTS_VERSION = \"$version\" in cloud/src/api/live.rs"
