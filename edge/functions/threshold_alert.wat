;; Threshold alert: a telemetry event whose temperature is above 72 degC raises a critical
;; alert (stored on the edge, published on millrace/alerts/<function>). In the simulated
;; factory, temperature climbs above 72 degC in the minutes before a breakdown.
;;
;; It exports both entry points: `handle` for one event (manual calls) and `handle_batch` for
;; the events waiting in the trigger log, up to `batch_max` per invocation (one instance for
;; thousands of events when it is behind).
;;
;; Deploy: millrace-edge fn deploy threshold-alert edge/functions/threshold_alert.wat \
;;           --topic 'factory/+/+/+/telemetry'
(module
  (import "millrace" "event_number" (func $number (param i32 i32) (result f64)))
  (import "millrace" "alert" (func $alert (param i32 i32 i32) (result i32)))
  (import "millrace" "select_event" (func $select (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "temperature")
  (data (i32.const 16) "temperature above 72 degC")
  ;; The selected event: NaN (no temperature reading) compares false, nothing to do.
  (func $check
    (if (f64.gt (call $number (i32.const 0) (i32.const 11)) (f64.const 72))
      (then (drop (call $alert (i32.const 2) (i32.const 16) (i32.const 25))))))
  (func (export "handle") (result i32)
    (call $check)
    (i32.const 0))
  (func (export "handle_batch") (param $n i32) (result i32)
    (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (drop (call $select (local.get $i)))
        (call $check)
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0)))
