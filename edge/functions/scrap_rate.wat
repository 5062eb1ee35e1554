;; Scrap rate tracker: counts each machine's parts and scrapped parts in the function's
;; key-value store (keys <machine>/parts and <machine>/scrap, little-endian i64) and writes the
;; running scrap rate as the series <site>/<line>/<machine>/scrap_rate.
;; Runs with concurrency 1 (the default): its read-modify-write of the counters is not shared.
;;
;; Deploy: millrace-edge fn deploy scrap-rate edge/functions/scrap_rate.wat \
;;           --topic 'factory/+/+/+/part'
(module
  (import "millrace" "event_string" (func $string (param i32 i32 i32 i32) (result i32)))
  (import "millrace" "event_ts" (func $ts (result i64)))
  (import "millrace" "input_read" (func $read (param i32 i32 i32) (result i32)))
  (import "millrace" "kv_get" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "millrace" "kv_set" (func $set (param i32 i32 i32 i32) (result i32)))
  (import "millrace" "write_point" (func $point (param i32 i32 i64 f64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "outcome")
  (data (i32.const 16) "scrap")
  (data (i32.const 32) "/parts")
  (data (i32.const 48) "/scrap")
  (data (i32.const 64) "/scrap_rate")
  ;; Length of the machine name at 256.
  (global $dev (mut i32) (i32.const 0))

  ;; Appends a suffix to the machine name at 256; returns the key's length.
  (func $key (param $suffix i32) (param $len i32) (result i32)
    (memory.copy (i32.add (i32.const 256) (global.get $dev)) (local.get $suffix) (local.get $len))
    (i32.add (global.get $dev) (local.get $len)))

  ;; Adds $by to the counter <machine><suffix>; returns the new count.
  (func $add (param $suffix i32) (param $len i32) (param $by i64) (result i64)
    (local $k i32) (local $v i64)
    (local.set $k (call $key (local.get $suffix) (local.get $len)))
    (if (i32.eq (call $get (i32.const 256) (local.get $k) (i32.const 512) (i32.const 8)) (i32.const 8))
      (then (local.set $v (i64.load (i32.const 512)))))
    (local.set $v (i64.add (local.get $v) (local.get $by)))
    (i64.store (i32.const 512) (local.get $v))
    (drop (call $set (i32.const 256) (local.get $k) (i32.const 512) (i32.const 8)))
    (local.get $v))

  (func (export "handle") (result i32)
    (local $n i32) (local $scrap i64) (local $parts i64) (local $is_scrap i64)
    ;; The part's outcome (good, scrap, rework) at 128; absent: not a part event.
    (local.set $n (call $string (i32.const 0) (i32.const 7) (i32.const 128) (i32.const 16)))
    (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return (i32.const 0))))
    (global.set $dev (call $read (i32.const 2) (i32.const 256) (i32.const 190)))
    (if (i32.or (i32.le_s (global.get $dev) (i32.const 0)) (i32.gt_s (global.get $dev) (i32.const 190)))
      (then (return (i32.const 1))))
    ;; outcome == "scrap": 5 bytes, "scra" as one word and "p".
    (local.set $is_scrap (i64.extend_i32_u
      (i32.and (i32.eq (local.get $n) (i32.const 5))
        (i32.and (i32.eq (i32.load (i32.const 128)) (i32.load (i32.const 16)))
                 (i32.eq (i32.load8_u (i32.const 132)) (i32.load8_u (i32.const 20)))))))
    (local.set $parts (call $add (i32.const 32) (i32.const 6) (i64.const 1)))
    (local.set $scrap (call $add (i32.const 48) (i32.const 6) (local.get $is_scrap)))
    (drop (call $point (i32.const 256) (call $key (i32.const 64) (i32.const 11)) (call $ts)
      (f64.div (f64.convert_i64_u (local.get $scrap)) (f64.convert_i64_u (local.get $parts)))))
    (i32.const 0)))
