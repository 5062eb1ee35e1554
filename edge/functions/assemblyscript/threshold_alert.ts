// Threshold alert in AssemblyScript (the WAT example's twin, with the value in the message).
// Build: npm ci && npm run build   ->  build/threshold_alert.wasm
// Deploy: millrace-edge fn deploy threshold-alert-as build/threshold_alert.wasm \
//           --topic 'factory/+/+/+/telemetry'

@external("millrace", "event_number")
declare function event_number(ptr: usize, len: i32): f64;

@external("millrace", "alert")
declare function alert(severity: i32, ptr: usize, len: i32): i32;

const LIMIT: f64 = 72.0;
const CRITICAL: i32 = 2;

function utf8(s: string): ArrayBuffer {
  return String.UTF8.encode(s);
}

export function handle(): i32 {
  const key = utf8("temperature");
  const t = event_number(changetype<usize>(key), key.byteLength);
  // NaN: the event has no temperature reading.
  if (!isNaN(t) && t > LIMIT) {
    const msg = utf8("temperature " + t.toString() + " degC above " + LIMIT.toString() + " degC");
    alert(CRITICAL, changetype<usize>(msg), msg.byteLength);
  }
  return 0;
}
