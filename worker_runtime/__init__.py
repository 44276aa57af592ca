"""supabase-worker-kit runtime."""
