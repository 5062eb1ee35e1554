;; Unit conversion: writes each telemetry event's temperature in degrees Fahrenheit as a derived
;; series <site>/<line>/<machine>/temperature_f, at the event's timestamp. Derived points are
;; stored like device points and synced to the cloud.
;;
;; Deploy: millrace-edge fn deploy unit-conversion edge/functions/unit_conversion.wat \
;;           --topic 'factory/+/+/+/telemetry'
(module
  (import "millrace" "event_number" (func $number (param i32 i32) (result f64)))
  (import "millrace" "event_ts" (func $ts (result i64)))
  (import "millrace" "input_read" (func $read (param i32 i32 i32) (result i32)))
  (import "millrace" "write_point" (func $point (param i32 i32 i64 f64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "temperature")
  (data (i32.const 32) "/temperature_f")
  (func (export "handle") (result i32)
    (local $c f64) (local $n i32)
    (local.set $c (call $number (i32.const 0) (i32.const 11)))
    ;; No temperature reading (NaN is not equal to itself): nothing to convert.
    (if (f64.ne (local.get $c) (local.get $c)) (then (return (i32.const 0))))
    ;; The device's machine, site/line/machine, at 256 (input part 2).
    (local.set $n (call $read (i32.const 2) (i32.const 256) (i32.const 200)))
    (if (i32.or (i32.le_s (local.get $n) (i32.const 0)) (i32.gt_s (local.get $n) (i32.const 200)))
      (then (return (i32.const 1))))
    (memory.copy (i32.add (i32.const 256) (local.get $n)) (i32.const 32) (i32.const 14))
    (if (call $point (i32.const 256) (i32.add (local.get $n) (i32.const 14)) (call $ts)
          (f64.add (f64.div (f64.mul (local.get $c) (f64.const 9)) (f64.const 5)) (f64.const 32)))
      (then (return (i32.const 2))))
    (i32.const 0)))
