"""The built-in Linux guest: Debian's kernel and busybox (fetched, cached), numavm's initramfs
and /init, the kernel command line and console, booted on either engine."""
