//! The boot entries: a 32→64-bit trampoline for PVH and Multiboot2, a 64-bit Linux boot entry.
//!
//! PVH and Multiboot2 enter in 32-bit protected mode with paging off: PVH (QEMU `-kernel`,
//! Firecracker, cloud-hypervisor) with `ebx` = physical address of `hvm_start_info`; Multiboot2
//! (GRUB) with `eax` = 0x36d76289 and `ebx` = the boot information. One routine serves both: it
//! identity-maps the first 4 GiB with 2 MiB pages (just enough to reach the Rust code and the
//! boot information; `mm::paging` builds the real tables from the memory map), enables PAE,
//! long mode, SSE (prebuilt `core` uses it) and paging, and calls
//! `tandem_kernel_entry(eax, ebx)`. Each names this entry itself (the PVH ELF note, the
//! Multiboot2 entry-address tag), so the ELF `e_entry` is free for the third protocol.
//!
//! The Linux x86-64 boot protocol (OpenVMM; Firecracker and cloud-hypervisor with an ELF
//! kernel) jumps to the ELF `e_entry` already in long mode, `rsi` = the `boot_params` page,
//! interrupts off. What else it leaves is the loader's and lives in low RAM we may not keep
//! (OpenVMM: GDT at 0x1000, page tables at 0x4000, no stack, no IDT), so the 64-bit entry
//! clears `.bss` (the protocol does not promise it zeroed), takes the boot stack, loads an
//! empty IDT (a fault before `interrupts::init` resets the VM instead of jumping through a
//! garbage table), our GDT and our own identity map of the first 4 GiB, enables SSE and calls
//! `tandem_kernel_entry(LINUX_BOOT_MAGIC, rsi)`.

use core::arch::global_asm;

/// Size of the boot stack the trampoline switches to; Rust runs on it until the app exits.
pub const BOOT_STACK_SIZE: usize = 256 * 1024;

global_asm!(
    r#"
    .section .multiboot2, "a"
    .balign 8
tandem_multiboot2_header:
    .long 0xE85250D6
    .long 0
    .long tandem_multiboot2_header_end - tandem_multiboot2_header
    .long -(0xE85250D6 + (tandem_multiboot2_header_end - tandem_multiboot2_header))
    /* information request tag: command line, memory map, ACPI RSDP (old and new) */
    .balign 8
    .short 1
    .short 0
    .long 24
    .long 1
    .long 6
    .long 14
    .long 15
    /* entry address tag: GRUB must use the 32-bit entry, not the ELF e_entry (64-bit) */
    .balign 8
    .short 3
    .short 0
    .long 12
    .long tandem_entry32
    /* end tag */
    .balign 8
    .short 0
    .short 0
    .long 8
tandem_multiboot2_header_end:

    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long tandem_entry32
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global tandem_entry32
tandem_entry32:
    cli
    cld
    movl %eax, %edi             /* boot magic (Multiboot2) or garbage (PVH) */
    movl %ebx, %esi             /* boot information */
    movl $tandem_boot_stack_top, %esp

    /* PML4[0] -> PDPT, PDPT[0..4] -> four page directories of 2 MiB pages = 0..4 GiB. */
    movl $tandem_boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, tandem_boot_pml4
    movl $0, tandem_boot_pml4 + 4

    xorl %ecx, %ecx
1:
    movl %ecx, %eax
    shll $12, %eax
    addl $tandem_boot_pd, %eax
    orl $0x3, %eax
    movl %eax, tandem_boot_pdpt(,%ecx,8)
    movl $0, tandem_boot_pdpt + 4(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jne 1b

    xorl %ecx, %ecx
2:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax             /* present | writable | 2 MiB page */
    movl %eax, tandem_boot_pd(,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax              /* bits 32.. of (ecx << 21) */
    movl %eax, tandem_boot_pd + 4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jne 2b

    movl $tandem_boot_pml4, %eax
    movl %eax, %cr3

    /* CR4: PAE (5), OSFXSR (9), OSXMMEXCPT (10). */
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4

    /* EFER.LME */
    movl $0xC0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    wrmsr

    /* CR0: PG (31), WP (16), NE (5), MP (1); clear EM (2) and TS (3) so SSE works. */
    movl %cr0, %eax
    andl $~((1 << 2) | (1 << 3)), %eax
    orl $((1 << 31) | (1 << 16) | (1 << 5) | (1 << 1)), %eax
    movl %eax, %cr0

    lgdt tandem_boot_gdt_pointer
    ljmp $0x08, $tandem_entry64

    .code64
tandem_entry64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movl %edi, %edi             /* zero-extend: upper halves are undefined after the switch */
    movl %esi, %esi
    movabsq $tandem_boot_stack_top, %rsp
    xorl %ebp, %ebp
    fninit
    call tandem_kernel_entry
3:
    cli
    hlt
    jmp 3b

    /* The Linux x86-64 boot protocol entry (ELF e_entry): long mode, rsi = boot_params. */
    .global tandem_linux_entry64
tandem_linux_entry64:
    cli
    cld
    movq %rsi, %r12             /* boot_params, kept across the loops below */

    /* Clear .bss: the boot stack and page tables live there and must start zeroed. A plain
       loop: `rep stosb` here, on the loader's segments, never completed under OpenVMM nested
       in QEMU/TCG. */
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    xorl %eax, %eax
8:
    movq %rax, (%rdi)
    addq $8, %rdi
    cmpq %rcx, %rdi
    jb 8b

    leaq tandem_boot_stack_top(%rip), %rsp
    lidt tandem_boot_null_idt_pointer(%rip)
    lgdt tandem_boot_gdt_pointer64(%rip)
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    leaq 4f(%rip), %rax
    pushq $0x08
    pushq %rax
    lretq                       /* reload CS from our GDT */
4:
    /* Same identity map as the 32-bit path: PML4[0] -> PDPT -> four PDs of 2 MiB pages. */
    leaq tandem_boot_pdpt(%rip), %rax
    orq $0x3, %rax
    movq %rax, tandem_boot_pml4(%rip)
    leaq tandem_boot_pdpt(%rip), %rdx
    leaq tandem_boot_pd(%rip), %rsi
    xorl %ecx, %ecx
5:
    movq %rcx, %rax
    shlq $12, %rax
    addq %rsi, %rax
    orq $0x3, %rax
    movq %rax, (%rdx,%rcx,8)
    incl %ecx
    cmpl $4, %ecx
    jne 5b
    xorl %ecx, %ecx
6:
    movq %rcx, %rax
    shlq $21, %rax
    orq $0x83, %rax             /* present | writable | 2 MiB page */
    movq %rax, (%rsi,%rcx,8)
    incl %ecx
    cmpl $2048, %ecx
    jne 6b
    leaq tandem_boot_pml4(%rip), %rax
    movq %rax, %cr3

    /* CR4: PAE (5), OSFXSR (9), OSXMMEXCPT (10). */
    movq %cr4, %rax
    orq $((1 << 5) | (1 << 9) | (1 << 10)), %rax
    movq %rax, %cr4
    /* CR0: WP (16), NE (5), MP (1); clear EM (2) and TS (3) so SSE works. */
    movq %cr0, %rax
    andq $~((1 << 2) | (1 << 3)), %rax
    orq $((1 << 16) | (1 << 5) | (1 << 1)), %rax
    movq %rax, %cr0
    fninit

    movl ${linux_magic}, %edi
    movq %r12, %rsi
    xorl %ebp, %ebp
    call tandem_kernel_entry
7:
    cli
    hlt
    jmp 7b

    .section .rodata
    .balign 16
tandem_boot_null_idt_pointer:
    .short 0
    .quad 0
    .balign 16
tandem_boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF    /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF    /* 0x10: data */
tandem_boot_gdt_end:
    .balign 4
tandem_boot_gdt_pointer:
    .short tandem_boot_gdt_end - tandem_boot_gdt - 1
    .long tandem_boot_gdt
    /* lgdt in 64-bit mode reads an 8-byte base */
    .balign 8
tandem_boot_gdt_pointer64:
    .short tandem_boot_gdt_end - tandem_boot_gdt - 1
    .quad tandem_boot_gdt

    .section .bss
    .balign 4096
tandem_boot_pml4:
    .skip 4096
tandem_boot_pdpt:
    .skip 4096
tandem_boot_pd:
    .skip 4096 * 4
    .balign 4096
    .global tandem_boot_stack_guard
tandem_boot_stack_guard:
    .skip 4096
    .global tandem_boot_stack_bottom
tandem_boot_stack_bottom:
    .skip {stack_size}
tandem_boot_stack_top:
    .code64
    "#,
    stack_size = const BOOT_STACK_SIZE,
    linux_magic = const super::LINUX_BOOT_MAGIC,
    options(att_syntax)
);
