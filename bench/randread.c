/* 4 KiB random reads with O_DIRECT from a block device, for the disk benchmark's guests.
 *
 *   randread DEVICE COUNT     prints "randread N reads in S s: R IOPS"
 *
 * Offsets come from a fixed xorshift sequence, aligned to 4 KiB over the whole device, so
 * numavm's guest and QEMU's read the same blocks in the same order.  Built static (the guest
 * has no libc of its own).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: randread DEVICE COUNT\n");
        return 2;
    }
    long count = atol(argv[2]);
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0 || size < 4096) {
        perror("BLKGETSIZE64");
        return 1;
    }
    void *buf;
    if (posix_memalign(&buf, 4096, 4096)) {
        return 1;
    }
    uint64_t blocks = size / 4096, x = 0x9E3779B97F4A7C15ull;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        if (pread(fd, buf, 4096, (off_t)(x % blocks) * 4096) != 4096) {
            perror("pread");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("randread %ld reads in %.3f s: %.0f IOPS\n", count, s, count / s);
    return 0;
}
