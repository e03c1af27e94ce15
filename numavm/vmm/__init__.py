"""Running the guest: the run's inputs and result, engine selection, and the two engines:
numavm's own on KVM (`vmm.kvm`) and QEMU's TCG (`vmm.tcg`)."""
