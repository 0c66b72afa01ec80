/* The benchmark floor's init: power the VM off at once (QEMU runs with -no-reboot). */
#include <sys/reboot.h>
#include <unistd.h>

int main(void) {
    reboot(RB_AUTOBOOT);
    return 1;
}
