/* The bare KVM_RUN round trip, with no Python: n x ioctl(vcpu, KVM_RUN).
   Used by bench/child.py (exits ... c) to split an exit's cost into kernel and Python. */
#include <sys/ioctl.h>

#define KVM_RUN 0xAE80 /* _IO(KVMIO, 0x80) */

long kvm_run_loop(int fd, long n)
{
    long i;
    for (i = 0; i < n; i++)
        if (ioctl(fd, KVM_RUN, 0) < 0)
            break;
    return i;
}
