/* keep_modules.c: linked into the MPI programs of the sanitizer builds only (never a release).
   Open MPI unloads its MCA components (dlclose) in MPI_Finalize, before LeakSanitizer checks at
   exit: their allocation stacks then print as "<unknown module>" and no suppression can name
   them. With dlclose a no-op every module stays mapped, its frames keep their file names, and
   tests/sanitizers/lsan.supp matches Open MPI's own leaks by module. The process ends right
   after, so nothing is lost by keeping them loaded. */
int dlclose(void *handle);
int dlclose(void *handle) {
  (void)handle;
  return 0;
}
