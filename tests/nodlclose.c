/*
 * nodlclose.c: preloaded in the sanitizer stage (tests/runner.py). The Vulkan loader
 * dlcloses its drivers at vkDestroyInstance; LeakSanitizer then cannot name the module
 * that allocated what the driver keeps for the life of the process, and reports it as a
 * leak of "<unknown module>". Keeping libraries mapped keeps their memory reachable, so
 * what remains reported is ours.
 */
int dlclose(void *handle);
int dlclose(void *handle)
{
    (void)handle;
    return 0;
}
