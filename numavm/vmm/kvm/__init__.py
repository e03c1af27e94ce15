"""The KVM engine: the ioctl bindings (the only module that issues ioctls), the CPU entry
state, and the machine that assembles memory, vCPUs and devices and runs them."""
