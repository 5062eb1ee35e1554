;; Threshold alert: a telemetry event whose temperature is above 72 degC raises a critical
;; alert (stored on the edge, published on millrace/alerts/<function>). In the simulated
;; factory, temperature climbs above 72 degC in the minutes before a breakdown.
;;
;; Deploy: millrace-edge fn deploy threshold-alert edge/functions/threshold_alert.wat \
;;           --topic 'factory/+/+/+/telemetry'
(module
  (import "millrace" "event_number" (func $number (param i32 i32) (result f64)))
  (import "millrace" "alert" (func $alert (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "temperature")
  (data (i32.const 16) "temperature above 72 degC")
  (func (export "handle") (result i32)
    (local $t f64)
    (local.set $t (call $number (i32.const 0) (i32.const 11)))
    ;; NaN (no temperature reading) compares false: nothing to do.
    (if (f64.gt (local.get $t) (f64.const 72))
      (then (drop (call $alert (i32.const 2) (i32.const 16) (i32.const 25)))))
    (i32.const 0)))
