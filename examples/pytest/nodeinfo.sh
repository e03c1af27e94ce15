#!/bin/sh
# nodeinfo: the machine as a NUMA-aware program sees it, one line per node from
# /sys/devices/system/node:  node N cpus LIST mem_kb KB distance D0 D1 ...
# (a memory-only node's cpus are "-").
for d in /sys/devices/system/node/node[0-9]*; do
  n=${d##*/node}
  cpus=$(cat "$d/cpulist")  # busybox read gets nothing from this sysfs file
  mem=$(awk '/MemTotal/ { print $4 }' "$d/meminfo")
  dist=$(cat "$d/distance")
  echo "node $n cpus ${cpus:--} mem_kb $mem distance $dist"
done
