;; Hourly summary: counts parts and scrap as part events arrive (key-value store) and, when its
;; schedule fires (or when invoked by hand without a part event), publishes {"at_ms":..,"parts":..,"scrap":..} on
;; factory/summary/hourly, logs it and starts counting again.
;;
;; Deploy: millrace-edge fn deploy hourly-summary edge/functions/hourly_summary.wat \
;;           --topic 'factory/+/+/+/part' --schedule '0 * * * *'
(module
  (import "millrace" "event_string" (func $string (param i32 i32 i32 i32) (result i32)))
  (import "millrace" "event_ts" (func $ts (result i64)))
  (import "millrace" "kv_get" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "millrace" "kv_set" (func $set (param i32 i32 i32 i32) (result i32)))
  (import "millrace" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (import "millrace" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "parts")
  (data (i32.const 8) "scrap")
  (data (i32.const 16) "outcome")
  (data (i32.const 32) "factory/summary/hourly")
  (data (i32.const 64) "{\"at_ms\":")
  (data (i32.const 80) ",\"parts\":")
  (data (i32.const 96) ",\"scrap\":")

  ;; The counter under key (ptr, 5 bytes); 0 when unset.
  (func $count (param $key i32) (result i64)
    (if (result i64) (i32.eq (call $get (local.get $key) (i32.const 5) (i32.const 512) (i32.const 8)) (i32.const 8))
      (then (i64.load (i32.const 512)))
      (else (i64.const 0))))

  (func $store (param $key i32) (param $v i64)
    (i64.store (i32.const 512) (local.get $v))
    (drop (call $set (local.get $key) (i32.const 5) (i32.const 512) (i32.const 8))))

  ;; Writes the decimal digits of $v at $p; returns how many.
  (func $digits (param $v i64) (param $p i32) (result i32)
    (local $n i32) (local $t i64) (local $i i32)
    (local.set $n (i32.const 1))
    (local.set $t (i64.div_u (local.get $v) (i64.const 10)))
    (block $done (loop $more
      (br_if $done (i64.eqz (local.get $t)))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (local.set $t (i64.div_u (local.get $t) (i64.const 10)))
      (br $more)))
    (local.set $i (local.get $n))
    (loop $write
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (i32.add (local.get $p) (local.get $i))
        (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $v) (i64.const 10)))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $write (i32.gt_s (local.get $i) (i32.const 0))))
    (local.get $n))

  ;; Appends (src, len) at $p; returns the new end.
  (func $put (param $p i32) (param $src i32) (param $len i32) (result i32)
    (memory.copy (local.get $p) (local.get $src) (local.get $len))
    (i32.add (local.get $p) (local.get $len)))

  (func (export "handle") (result i32)
    (local $n i32) (local $p i32)
    ;; A part event (from a device, or given by hand): count it.
    (local.set $n (call $string (i32.const 16) (i32.const 7) (i32.const 160) (i32.const 16)))
    (if (i32.ge_s (local.get $n) (i32.const 0))
      (then
        (call $store (i32.const 0) (i64.add (call $count (i32.const 0)) (i64.const 1)))
        (if (i32.and (i32.eq (local.get $n) (i32.const 5))
                     (i32.eq (i32.load (i32.const 160)) (i32.load (i32.const 8))))
          (then (call $store (i32.const 8) (i64.add (call $count (i32.const 8)) (i64.const 1)))))
        (return (i32.const 0))))
    ;; Anything else (the schedule, or a call by hand without a part): publish the summary at
    ;; 1024 and reset.
    (local.set $p (call $put (i32.const 1024) (i32.const 64) (i32.const 9)))
    (local.set $p (i32.add (local.get $p) (call $digits (call $ts) (local.get $p))))
    (local.set $p (call $put (local.get $p) (i32.const 80) (i32.const 9)))
    (local.set $p (i32.add (local.get $p) (call $digits (call $count (i32.const 0)) (local.get $p))))
    (local.set $p (call $put (local.get $p) (i32.const 96) (i32.const 9)))
    (local.set $p (i32.add (local.get $p) (call $digits (call $count (i32.const 8)) (local.get $p))))
    (i32.store8 (local.get $p) (i32.const 125))
    (local.set $p (i32.add (local.get $p) (i32.const 1)))
    (if (call $publish (i32.const 32) (i32.const 22) (i32.const 1024) (i32.sub (local.get $p) (i32.const 1024)))
      (then (return (i32.const 1))))
    (call $log (i32.const 1) (i32.const 1024) (i32.sub (local.get $p) (i32.const 1024)))
    (call $store (i32.const 0) (i64.const 0))
    (call $store (i32.const 8) (i64.const 0))
    (i32.const 0)))
