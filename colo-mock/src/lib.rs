//! colo-mock: a mock hypervisor whose guest RAM is an mmap'd shmem file with kernel-tracked
//! dirty pages, and whose guests are deterministic workloads on their own threads.
